"""Stage 3 of AgriCLIP: cross-model alignment of the backbone's features into CLIP's image-embedding space.

Streams the pretraining images once through the frozen backbone (stage 2) and the frozen CLIP image tower
(stage 1) and fits the linear aligner `y ≈ x Wᵀ + b` by mean squared error:

- `--method closed-form` (default): the exact MSE optimum from streamed sufficient statistics (float64, memory
  independent of the number of images, summed across processes, optional ridge);
- `--method sgd`: the paper's recipe (scalar variance normalisation to 4.5, SGD, cosine schedule) with the
  features in memory, the bias exported correctly (`--legacy-bias-scaling` reproduces the original code's).

Reports MSE and R² on a held-out split (or, for data without a `validation` split, on a seeded --val-fraction of
the training images, not fitted on) and writes the aligner into a complete AgriCLIP folder:

    python -m training.stage3_align --model runs/stage2/final --train-data data/pretrain --output-dir runs/stage3
"""

from __future__ import annotations

from pathlib import Path

from agriclip.errors import run_command
from training.options import add_column_arguments, add_validation_arguments, parse_args, script_parser

# How to redo a stopped stage 3, which keeps no checkpoints, when run on its own.
RESTART_HINT = "run the same command again to start it over"


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    parser.add_argument("--model", required=True, help="AgriCLIP folder or Hub id holding the trained CLIP image tower and backbone.")
    parser.add_argument("--train-data", required=True, help="Images to fit on (any image-caption source; captions are ignored).")
    parser.add_argument("--train-split", default="train", help="Split of --train-data to fit on.")
    add_column_arguments(parser)
    add_validation_arguments(parser, "MSE and R²")
    parser.add_argument("--output-dir", required=True, help="Folder for the final AgriCLIP checkpoint, metrics and logs.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per process per forward pass of feature extraction.")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Overrides the launcher's precision for feature extraction (statistics stay float64).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the SGD recipe and of a held-out --val-fraction.")
    parser.add_argument("--feature-cache", default=None,
                        help="Folder to keep the extracted features in (safetensors per split and process); reused when present.")
    parser.add_argument("--method", choices=["closed-form", "sgd"], default="closed-form", help="How to fit the aligner.")
    parser.add_argument("--ridge", type=float, default=0.0, help="Closed form: L2 penalty on W (not on the bias).")
    sgd = parser.add_argument_group("paper's SGD recipe (--method sgd)")
    sgd.add_argument("--sgd-epochs", type=int, default=70, help="Epochs (70 in AgriCLIP).")
    sgd.add_argument("--sgd-lr", type=float, default=0.01, help="Learning rate.")
    sgd.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    sgd.add_argument("--sgd-weight-decay", type=float, default=5e-4, help="SGD weight decay.")
    sgd.add_argument("--sgd-batch-size", type=int, default=100, help="Feature pairs per SGD step.")
    sgd.add_argument("--sgd-t-max", type=int, default=200, help="CosineAnnealingLR T_max (epochs); 200 in the paper.")
    sgd.add_argument("--target-variance", type=float, default=4.5, help="Variance the features are scaled to.")
    sgd.add_argument("--legacy-bias-scaling", action="store_true",
                     help="Export the bias as the original code does (b' c1/c2, wrong); only to reproduce released aligners.")
    parser.add_argument("--log-with", default="auto", help="Accelerate trackers, as in the other stages.")
    return parser


def main(argv: list[str] | None = None, resume_hint: str = RESTART_HINT) -> Path:
    """Runs stage 3 with `argv` (default: the command line); `resume_hint` says how to redo a stopped run in the
    caller's context."""
    args = parse_args(build_parser(), argv)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.alignment import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
