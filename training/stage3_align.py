"""Stage 3 of AgriCLIP: cross-model alignment of the backbone's features into CLIP's embedding space.

Streams the pretraining images once through the frozen backbone (stage 2) and the frozen CLIP towers (stage 1)
and fits the linear aligner `ŷ = x Wᵀ + b` by the objective `--objective` names:

- `image-mse` (default, the paper's): least squares onto the CLIP image embedding of each image, by
  `--method closed-form` (default: the exact optimum from streamed sufficient statistics, float64, memory
  independent of the number of images, summed across processes, with a ridge) or `--method sgd` (the paper's
  recipe: scalar variance normalisation to 4.5, SGD, cosine schedule, the features in memory, the bias exported
  correctly; `--legacy-bias-scaling` reproduces the original code's);
- `text-mse`: least squares, in closed form from the same streamed statistics, onto each image's caption target:
  the mean of the L2-normalised CLIP text embeddings of its caption variants (`captions`, else its `caption`);
- `contrastive`: the `text-mse` solution, then trained with image-to-text InfoNCE against the caption targets at
  the temperature stage 1 learned (AdamW, the features in memory, the same on every process).

On the validation pairs (the `validation` split, or, for data without one, a seeded --val-fraction of the training
images, not fitted on), and only there, it chooses the ridge (from --ridge-grid, unless --ridge is given) and the
fusion weight of the CLIP and aligned image embeddings (from --fusion-grid, by image-to-text recall@1 against the
caption targets, identical caption sets counting as one). It logs every candidate's score, reports MSE and R² onto
the objective's target, and writes the aligner, the objective and the fusion weight into a complete AgriCLIP folder:

    python -m training.stage3_align --model runs/stage2/final --train-data data/pretrain --output-dir runs/stage3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agriclip.errors import run_command
from training.options import add_column_arguments, add_validation_arguments, parse_args, script_parser


# How to redo a stopped stage 3, which keeps no checkpoints, when run on its own.
RESTART_HINT = "run the same command again to start it over"

# The alignment objectives, as `training.aligner.ALIGNMENT_OBJECTIVES` names them (this module imports no torch;
# a test checks that the two agree).
OBJECTIVES = ("image-mse", "text-mse", "contrastive")

# Candidates chosen among on the validation pairs: ridges as fractions of the mean feature variance, and CLIP weights
# of the fused image embedding (0 is the aligned embedding alone, 1 the CLIP tower alone).
RIDGE_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
FUSION_GRID = tuple(step / 10 for step in range(11))


def non_negative(text: str) -> float:
    """argparse type of a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a number >= 0 is needed, not {text}")
    return value


def unit_interval(text: str) -> float:
    """argparse type of a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a number in [0, 1] is needed, not {text}")
    return value


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    parser.add_argument(
        "--model", required=True, help="AgriCLIP folder or Hub id holding the trained CLIP towers and backbone."
    )
    parser.add_argument(
        "--train-data",
        required=True,
        help="Image-caption pairs to fit on (any image-caption source; image-mse ignores the captions).",
    )
    parser.add_argument("--train-split", default="train", help="Split of --train-data to fit on.")
    add_column_arguments(parser)
    add_validation_arguments(parser, "choosing the ridge and the fusion weight, and MSE and R²")
    parser.add_argument(
        "--output-dir", required=True, help="Folder for the final AgriCLIP checkpoint, metrics and logs."
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="Images per process per forward pass of feature extraction."
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Overrides the launcher's precision for feature extraction (statistics stay float64).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the SGD recipe, of the contrastive head and of a held-out --val-fraction.",
    )
    parser.add_argument(
        "--feature-cache",
        default=None,
        help="Folder to keep the extracted features in (safetensors per split and process); reused when present.",
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="image-mse",
        help="What the aligner is fitted to: image-mse (the CLIP image embedding, the paper's), text-mse "
        "(the CLIP text embeddings of each image's captions, closed form) or contrastive (InfoNCE "
        "against them, started from the text-mse solution).",
    )
    parser.add_argument(
        "--method",
        choices=["closed-form", "sgd"],
        default="closed-form",
        help="How to fit --objective image-mse: the exact optimum, or the paper's SGD recipe.",
    )
    parser.add_argument(
        "--ridge",
        type=non_negative,
        default=None,
        help="Closed forms: L2 penalty on W (not on the bias), added to the feature covariance; given, it "
        "replaces the choice among --ridge-grid (default: chosen).",
    )
    parser.add_argument(
        "--ridge-grid",
        type=non_negative,
        nargs="+",
        default=list(RIDGE_GRID),
        help="Closed forms without --ridge: the ridges to choose from on the validation pairs, as "
        "fractions of the mean variance of a feature dimension; image-mse keeps the best held-out "
        "R², the text objectives the best image-to-text recall@1 (ties: the first).",
    )
    parser.add_argument(
        "--fusion-grid",
        type=unit_interval,
        nargs="+",
        default=list(FUSION_GRID),
        help="CLIP weights of the fused image embedding to choose from on the validation pairs by "
        "image-to-text recall@1 (ties: the first); the choice becomes the config's fusion_weight. "
        "One value fixes it.",
    )
    parser.add_argument(
        "--validation-match",
        choices=["caption", "label"],
        default="caption",
        help="Which caption counts as a validation image's own in that recall@1: its own caption set "
        "(or an identical one), or any of an image of the same class (`source` and `label` "
        "columns): caption-as-class accuracy, a steadier choice when every image has captions "
        "of its own.",
    )
    sgd = parser.add_argument_group("paper's SGD recipe (--method sgd)")
    sgd.add_argument("--sgd-epochs", type=int, default=70, help="Epochs (70 in AgriCLIP).")
    sgd.add_argument("--sgd-lr", type=float, default=0.01, help="Learning rate.")
    sgd.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    sgd.add_argument("--sgd-weight-decay", type=float, default=5e-4, help="SGD weight decay.")
    sgd.add_argument("--sgd-batch-size", type=int, default=100, help="Feature pairs per SGD step.")
    sgd.add_argument("--sgd-t-max", type=int, default=200, help="CosineAnnealingLR T_max (epochs); 200 in the paper.")
    sgd.add_argument("--target-variance", type=float, default=4.5, help="Variance the features are scaled to.")
    sgd.add_argument(
        "--legacy-bias-scaling",
        action="store_true",
        help="Export the bias as the original code does (b' c1/c2, wrong); only to reproduce released aligners.",
    )
    contrastive = parser.add_argument_group("contrastive head (--objective contrastive)")
    contrastive.add_argument("--contrastive-epochs", type=int, default=20, help="Passes over the training features.")
    contrastive.add_argument(
        "--contrastive-lr", type=float, default=1e-3, help="AdamW learning rate (no weight decay)."
    )
    contrastive.add_argument(
        "--contrastive-batch-size",
        type=int,
        default=256,
        help="Images per step; each is contrasted with the distinct caption targets of its batch.",
    )
    parser.add_argument("--log-with", default="auto", help="Accelerate trackers, as in the other stages.")
    return parser


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses, through `parser.error`, options that would be ignored."""
    if args.method == "sgd" and args.objective != "image-mse":
        parser.error(f"--method sgd is the paper's recipe for --objective image-mse, not for {args.objective}")
    if args.method == "sgd" and args.ridge is not None:
        parser.error("--ridge applies to the closed forms; the SGD recipe has --sgd-weight-decay")
    if args.contrastive_epochs < 1 or args.contrastive_batch_size < 2:
        parser.error("--contrastive-epochs must be >= 1 and --contrastive-batch-size >= 2")


def main(argv: list[str] | None = None, resume_hint: str = RESTART_HINT) -> Path:
    """Runs stage 3 with `argv` (default: the command line); `resume_hint` says how to redo a stopped run in the
    caller's context."""
    parser = build_parser()
    args = parse_args(parser, argv)
    check_options(parser, args)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.alignment import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
