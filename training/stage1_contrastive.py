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

from dataclasses import dataclass
from pathlib import Path

from agriclip.errors import run_command
from training.loss_table import CONTRASTIVE_LOSSES
from training.options import (
    RESUME_HINT,
    ColumnOptions,
    LoopOptions,
    ModelOption,
    ValidationOptions,
    option,
    options_parser,
    parse_options,
)


@dataclass(kw_only=True)
class ContrastiveOptions(LoopOptions, ValidationOptions, ColumnOptions, ModelOption):
    """The options of stage 1 (and of the equal-compute CLIP control, which is stage 1 for a longer budget)."""

    train_data: str = option(
        "Image-caption pairs: image folder with metadata, CSV, datasets folder or Hub id, or WebDataset shards."
    )
    train_split: str = option("Split of --train-data to train on.", "train")
    eval_every: int = option(
        "Validate every N optimizer steps (0: only at the end): recall@1/5 image-to-text and "
        "text-to-image, where a caption with the same text as the true one counts as a hit.",
        0,
    )
    loss: str = option(
        "Contrastive loss of the towers (training.losses.create_loss): "
        + "; ".join(f"{name}: {description}" for name, (_, description) in CONTRASTIVE_LOSSES.items())
        + ". A model whose config records another objective starts from the loss's published logit scale (and "
        "bias), and the exported config records the new one.",
        "infonce",
        choices=tuple(CONTRASTIVE_LOSSES),
    )
    learning_rate: float = option("Peak learning rate (AdamW), reached at the end of the warm-up.", 5e-5)
    min_learning_rate: float = option("Learning rate at the end of the cosine decay.", 0.0)
    warmup_steps: int = option(
        "Linear warm-up optimizer steps before the cosine decay: step i of n takes the peak x (i + 1) / n.", 0
    )
    weight_decay: float = option("AdamW weight decay (none on norms, biases, embeddings, temperature).", 0.2)
    adam_betas: tuple[float, float] = option("AdamW betas (CLIP's).", (0.9, 0.98))
    adam_eps: float = option("AdamW epsilon (CLIP's for ViT).", 1e-6)
    freeze_text: bool = option("Keep the text tower and its projection fixed.", False)
    freeze_image: bool = option("Keep the CLIP image tower and its projection fixed.", False)
    augment: bool = option(
        "Augment the training images as open_clip trains CLIP (a random resized crop, resized "
        "back to the model's image size), plus a horizontal flip, batched on the training device "
        "(training.dino.CropAndFlip); the validation images are never augmented.",
        False,
        group="augmentation",
    )
    crop_scale: tuple[float, float] = option(
        "With --augment: the crop's share of the processed image's area (open_clip's).",
        (0.9, 1.0),
        metavar=("MIN", "MAX"),
        group="augmentation",
    )
    flip_prob: float = option("With --augment: probability of a horizontal flip.", 0.5, group="augmentation")


def build_parser():
    """The command-line parser of stage 1 (its --help)."""
    return options_parser(ContrastiveOptions, f"python -m {__spec__.name}", __doc__)


def run(options: ContrastiveOptions, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 1; `resume_hint` says how to continue a stopped run in the caller's context (`training.run_all`
    resumes by itself)."""
    # The heavy stack loads only here: --help and argument errors answer at once.
    from training.contrastive import run

    return run(options, resume_hint)


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 1 with the options of `argv` (default: the command line)."""
    return run(
        parse_options(ContrastiveOptions, argv, prog=f"python -m {__spec__.name}", description=__doc__), resume_hint
    )


if __name__ == "__main__":
    run_command(main, __spec__.name)
