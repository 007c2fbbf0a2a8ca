"""Stage 2 of AgriCLIP: DINO self-distillation of the fine-grained image backbone, with no labels.

A student (backbone + DINO head) sees 2 global and N local crops of each image; a teacher, the exponential
moving average of the student, sees the global crops; the student learns to match the teacher's centred,
sharpened outputs (Caron et al. 2021, as in facebookresearch/dino main_dino.py). Multi-crop augmentation runs
batched on the training device (kornia). Runs the same under `python` and `accelerate launch`:

    python -m training.stage2_dino --model runs/stage1/final --train-data data/pretrain --output-dir runs/stage2

Writes the trained teacher backbone into the AgriCLIP checkpoint (`<output-dir>/final`) and as a standalone
transformers model (`<output-dir>/backbone`).

With `--knn-data`, the k-NN top-1 accuracy of the teacher's features is logged before and after training, by DINO's
protocol: the images of `--knn-bank-split` (e.g. train) form the memory bank and those of `--knn-query-split` (e.g.
test) are classified by it; without the two splits, seeded halves of `--knn-data` play the two parts.
"""

from __future__ import annotations

from pathlib import Path

from agriclip.errors import run_command
from training.options import (
    RESUME_HINT,
    add_column_arguments,
    add_model_argument,
    add_runtime_arguments,
    parse_args,
    script_parser,
)


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    add_model_argument(parser)
    parser.add_argument("--backbone", default=None, help="Start from the weights of this transformers ViT/DINOv2/ResNet checkpoint (folder or Hub id; same architecture as the model's backbone).")
    parser.add_argument("--random-init", action="store_true", help="Start the backbone from random initialisation.")
    parser.add_argument("--train-data", required=True, help="Images: any image-caption source (captions are ignored) or image folder with metadata.")
    parser.add_argument("--train-split", default="train", help="Split of --train-data.")
    add_column_arguments(parser)
    knn = parser.add_argument_group("k-NN evaluation of the teacher's features (DINO's protocol)")
    knn.add_argument("--knn-data", default=None,
                     help="Labelled images: an image folder of class folders (optionally in split folders, e.g. train/ "
                          "and test/) or a datasets dataset with a ClassLabel column.")
    knn.add_argument("--knn-bank-split", default=None,
                     help="Split of --knn-data whose features form the memory bank, e.g. train (default: none, a "
                          "seeded half of --knn-data; give --knn-query-split with it).")
    knn.add_argument("--knn-query-split", default=None,
                     help="Split of --knn-data whose images are classified by the bank, e.g. test or validation "
                          "(default: none, the other half).")
    knn.add_argument("--knn-k", type=int, default=20, help="Neighbours of the k-NN vote.")
    crops = parser.add_argument_group("multi-crop")
    crops.add_argument("--crop-recipe", choices=["vit", "resnet"], default=None, help="Crop scales of the published recipe (default: by backbone type).")
    crops.add_argument("--global-size", type=int, default=None, help="Global crop size (default: the model's image size).")
    crops.add_argument("--local-size", type=int, default=None, help="Local crop size (default: 3/7 of the global size, 96 for 224).")
    crops.add_argument("--num-local-crops", type=int, default=8, help="Local crops per image.")
    head = parser.add_argument_group("DINO head and loss")
    head.add_argument("--out-dim", type=int, default=65536, help="Prototypes of the DINO head (65,536 published).")
    head.add_argument("--head-hidden-dim", type=int, default=2048, help="Hidden size of the head's MLP.")
    head.add_argument("--head-bottleneck-dim", type=int, default=256, help="Bottleneck size before the weight-normalised last layer.")
    head.add_argument("--no-norm-last-layer", dest="norm_last_layer", action="store_false", help="Let the last layer's weight norm train (DINO's option for stability with ViT-B).")
    head.add_argument("--freeze-last-layer-epochs", type=int, default=1, help="Epochs (of optimizer steps) during which the head's last layer stays fixed.")
    head.add_argument("--student-temp", type=float, default=0.1, help="Student softmax temperature.")
    head.add_argument("--teacher-temp", type=float, default=0.04, help="Teacher softmax temperature after warm-up.")
    head.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="Teacher temperature at the start of the warm-up.")
    head.add_argument("--warmup-teacher-temp-epochs", type=int, default=0, help="Epochs (of optimizer steps, at most the run) of linear teacher-temperature warm-up, per step.")
    head.add_argument("--center-momentum", type=float, default=0.9, help="Momentum of the centre of the teacher outputs.")
    head.add_argument("--momentum-teacher", type=float, default=0.996, help="Teacher EMA momentum at the start; a cosine over the run's optimizer steps takes it to 1.")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="adamw (ViT recipe) or sgd (ResNet-50 recipe); default by backbone type.")
    optim.add_argument("--learning-rate", type=float, default=None, help="Peak learning rate per 256 images: the run's peak is this x total batch (batch size x processes x accumulation) / 256, as the start-up banner prints; default from the recipe.")
    optim.add_argument("--min-learning-rate", type=float, default=1e-6, help="Learning rate at the end of the cosine decay.")
    optim.add_argument("--warmup-epochs", type=int, default=10, help="Linear learning-rate warm-up, in epochs of optimizer steps (at most the whole run).")
    optim.add_argument("--warmup-steps", type=int, default=None, help="Linear learning-rate warm-up in optimizer steps; when given, it replaces --warmup-epochs.")
    optim.add_argument("--weight-decay", type=float, default=None, help="Weight decay at the start (default from the recipe).")
    optim.add_argument("--weight-decay-end", type=float, default=None, help="Weight decay at the end of a cosine over the run's optimizer steps (default from the recipe).")
    optim.add_argument("--collapse-window", type=int, default=None, help="Stop when the teacher looks collapsed for this many consecutive steps (default: the learning-rate warm-up steps plus a tenth of the run's steps, at least 100).")
    add_runtime_arguments(parser)
    parser.set_defaults(batch_size=64, max_grad_norm=3.0, epochs=100)
    return parser


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with `argv` (default: the command line); `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if (args.knn_bank_split is None) != (args.knn_query_split is None):
        parser.error("--knn-bank-split and --knn-query-split go together (or leave both out to split --knn-data in halves)")
    if args.knn_bank_split and not args.knn_data:
        parser.error("--knn-bank-split and --knn-query-split name splits of --knn-data: give --knn-data")
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.distillation import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
