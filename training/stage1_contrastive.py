"""Stage 1 of AgriCLIP: contrastive image-text fine-tuning of the CLIP towers on domain image-caption pairs.

Runs the same under `python` and `accelerate launch` (CPU, one or many GPUs, many nodes):

    python -m training.stage1_contrastive --model tiny --train-data data/pretrain --output-dir runs/stage1
    accelerate launch -m training.stage1_contrastive --config stage1.yaml

The loss (--loss) is the symmetric InfoNCE of CLIP or SigLIP's sigmoid loss, on the global batch (features gathered
across processes with gradients); the exported config records it (`contrastive_loss`), and zero-shot then reads the
model's logits the matching way (softmax over labels, or per-label sigmoids). Only the CLIP towers train: the backbone
and the aligner are frozen here (stages 2 and 3).
Validation recall@1/5 (both directions) matches by caption text: with template captions shared by many images, a
retrieved caption identical to the true one is a hit. Data without a `validation` split holds a seeded
--val-fraction of its training pairs out for it.
Ends by writing a complete AgriCLIP folder (model + processor) to `<output-dir>/final`.
"""

from __future__ import annotations

from pathlib import Path

from agriclip.errors import run_command
from training.loss_table import CONTRASTIVE_LOSSES
from training.options import (
    RESUME_HINT,
    add_column_arguments,
    add_model_argument,
    add_runtime_arguments,
    add_validation_arguments,
    parse_args,
    script_parser,
)


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    add_model_argument(parser)
    parser.add_argument(
        "--train-data",
        required=True,
        help="Image-caption pairs: image folder with metadata, CSV, datasets folder or Hub id, or WebDataset shards.",
    )
    parser.add_argument("--train-split", default="train", help="Split of --train-data to train on.")
    add_column_arguments(parser)
    add_validation_arguments(parser, "validation recall")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="Validate every N optimizer steps (0: only at the end): recall@1/5 image-to-text and "
        "text-to-image, where a caption with the same text as the true one counts as a hit.",
    )
    parser.add_argument(
        "--loss",
        choices=list(CONTRASTIVE_LOSSES),
        default="infonce",
        help="Contrastive loss of the towers (training.losses.create_loss): "
        + "; ".join(f"{name}: {description}" for name, (_, description) in CONTRASTIVE_LOSSES.items())
        + ". A model whose config records another objective starts from the loss's published logit scale (and "
        "bias), and the exported config records the new one.",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=5e-5,
        help="Peak learning rate (AdamW), reached at the end of the warm-up.",
    )
    parser.add_argument(
        "--min-learning-rate", type=float, default=0.0, help="Learning rate at the end of the cosine decay."
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="Linear warm-up optimizer steps before the cosine decay: step i of n takes the peak x (i + 1) / n.",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.2,
        help="AdamW weight decay (none on norms, biases, embeddings, temperature).",
    )
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas (CLIP's).")
    parser.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon (CLIP's for ViT).")
    parser.add_argument("--freeze-text", action="store_true", help="Keep the text tower and its projection fixed.")
    parser.add_argument(
        "--freeze-image", action="store_true", help="Keep the CLIP image tower and its projection fixed."
    )
    augment = parser.add_argument_group("augmentation")
    augment.add_argument(
        "--augment",
        action="store_true",
        help="Augment the training images as open_clip trains CLIP (a random resized crop, resized "
        "back to the model's image size), plus a horizontal flip, batched on the training device "
        "(training.dino.CropAndFlip); the validation images are never augmented.",
    )
    augment.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=(0.9, 1.0),
        metavar=("MIN", "MAX"),
        help="With --augment: the crop's share of the processed image's area (open_clip's).",
    )
    augment.add_argument(
        "--flip-prob", type=float, default=0.5, help="With --augment: probability of a horizontal flip."
    )
    add_runtime_arguments(parser)
    return parser


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 1 with `argv` (default: the command line); `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    args = parse_args(build_parser(), argv)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.contrastive import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
