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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agriclip.errors import run_command
from training.options import (
    ColumnOptions,
    OutputOptions,
    ValidationOptions,
    option,
    options_parser,
    parse_options,
    redefault,
)


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


SGD = "paper's SGD recipe (--method sgd)"
CONTRASTIVE = "contrastive head (--objective contrastive)"


@dataclass(kw_only=True)
class AlignmentOptions(OutputOptions, ValidationOptions, ColumnOptions):
    """The options of stage 3, which needs no training loop: it streams the images once and fits."""

    model: str = option("AgriCLIP folder or Hub id holding the trained CLIP towers and backbone.")
    train_data: str = option(
        "Image-caption pairs to fit on (any image-caption source; image-mse ignores the captions)."
    )
    train_split: str = option("Split of --train-data to fit on.", "train")
    feature_cache: str | None = option(
        "Folder to keep the extracted features in (safetensors per split and process); reused when present.", None
    )
    objective: str = option(
        "What the aligner is fitted to: image-mse (the CLIP image embedding, the paper's), text-mse "
        "(the CLIP text embeddings of each image's captions, closed form) or contrastive (InfoNCE "
        "against them, started from the text-mse solution).",
        "image-mse",
        choices=OBJECTIVES,
    )
    method: Literal["closed-form", "sgd"] = option(
        "How to fit --objective image-mse: the exact optimum, or the paper's SGD recipe.", "closed-form"
    )
    ridge: float | None = option(
        "Closed forms: L2 penalty on W (not on the bias), added to the feature covariance; given, it "
        "replaces the choice among --ridge-grid (default: chosen).",
        None,
        parse=non_negative,
    )
    ridge_grid: tuple[float, ...] = option(
        "Closed forms without --ridge: the ridges to choose from on the validation pairs, as "
        "fractions of the mean variance of a feature dimension; image-mse keeps the best held-out "
        "R², the text objectives the best image-to-text recall@1 (ties: the first).",
        RIDGE_GRID,
        parse=non_negative,
    )
    fusion_grid: tuple[float, ...] = option(
        "CLIP weights of the fused image embedding to choose from on the validation pairs by "
        "image-to-text recall@1 (ties: the first); the choice becomes the config's fusion_weight. "
        "One value fixes it.",
        FUSION_GRID,
        parse=unit_interval,
    )
    validation_match: Literal["caption", "label"] = option(
        "Which caption counts as a validation image's own in that recall@1: its own caption set "
        "(or an identical one), or any of an image of the same class (`source` and `label` "
        "columns): caption-as-class accuracy, a steadier choice when every image has captions "
        "of its own.",
        "caption",
    )
    sgd_epochs: int = option("Epochs (70 in AgriCLIP).", 70, group=SGD)
    sgd_lr: float = option("Learning rate.", 0.01, group=SGD)
    sgd_momentum: float = option("SGD momentum.", 0.9, group=SGD)
    sgd_weight_decay: float = option("SGD weight decay.", 5e-4, group=SGD)
    sgd_batch_size: int = option("Feature pairs per SGD step.", 100, group=SGD)
    sgd_t_max: int = option("CosineAnnealingLR T_max (epochs); 200 in the paper.", 200, group=SGD)
    target_variance: float = option("Variance the features are scaled to.", 4.5, group=SGD)
    legacy_bias_scaling: bool = option(
        "Export the bias as the original code does (b' c1/c2, wrong); only to reproduce released aligners.",
        False,
        group=SGD,
    )
    contrastive_epochs: int = option("Passes over the training features.", 20, group=CONTRASTIVE)
    contrastive_lr: float = option("AdamW learning rate (no weight decay).", 1e-3, group=CONTRASTIVE)
    contrastive_batch_size: int = option(
        "Images per step; each is contrasted with the distinct caption targets of its batch.", 256, group=CONTRASTIVE
    )
    batch_size: int = redefault(OutputOptions, "batch_size", 64)

    def __post_init__(self):
        # Options that would be ignored are refused.
        if self.method == "sgd" and self.objective != "image-mse":
            raise ValueError(f"--method sgd is the paper's recipe for --objective image-mse, not for {self.objective}")
        if self.method == "sgd" and self.ridge is not None:
            raise ValueError("--ridge applies to the closed forms; the SGD recipe has --sgd-weight-decay")
        if self.contrastive_epochs < 1 or self.contrastive_batch_size < 2:
            raise ValueError("--contrastive-epochs must be >= 1 and --contrastive-batch-size >= 2")


def build_parser():
    """The command-line parser of stage 3 (its --help)."""
    return options_parser(AlignmentOptions, f"python -m {__spec__.name}", __doc__)


def run(options: AlignmentOptions, resume_hint: str = RESTART_HINT) -> Path:
    """Runs stage 3; `resume_hint` says how to redo a stopped run in the caller's context."""
    # The heavy stack loads only here: --help and argument errors answer at once.
    from training.alignment import run

    return run(options, resume_hint)


def main(argv: list[str] | None = None, resume_hint: str = RESTART_HINT) -> Path:
    """Runs stage 3 with the options of `argv` (default: the command line)."""
    return run(
        parse_options(AlignmentOptions, argv, prog=f"python -m {__spec__.name}", description=__doc__), resume_hint
    )


if __name__ == "__main__":
    run_command(main, __spec__.name)
