"""Stage 2 of AgriCLIP: DINO self-distillation of the fine-grained image backbone, with no labels.

A student (backbone + DINO head) sees 2 global and N local crops of each image; a teacher, the exponential
moving average of the student, sees the global crops; the student learns to match the teacher's centred,
sharpened outputs (Caron et al. 2021, as in facebookresearch/dino main_dino.py). Multi-crop augmentation runs
batched on the training device (training.dino.MultiCropAugmentation). Runs the same under `python` and `accelerate launch`:

    python -m training.stage2_dino --model runs/stage1/final --train-data data/pretrain --output-dir runs/stage2

Writes the trained teacher backbone into the AgriCLIP checkpoint (`<output-dir>/final`) and as a standalone
transformers model (`<output-dir>/backbone`).

With `--knn-data`, the k-NN top-1 accuracy of the teacher's features is logged before and after training, by DINO's
protocol: the images of `--knn-bank-split` (e.g. train) form the memory bank and those of `--knn-query-split` (e.g.
test) are classified by it; without the two splits, seeded halves of `--knn-data` play the two parts. At the end it is
set against an untrained control: a freshly randomly initialised backbone of the same architecture (seeded by `--seed`),
or the start itself when the backbone started from random weights. `<output-dir>/final/stage2_report.json` records the
recipe, those k-NN numbers and the teacher's final entropy and teacher-student KL.

`--recipe` names a full set of DINO settings; each flag given (on the command line or in `--config`) overrides its
value: `published`, DINO's published ViT settings (Caron et al. 2021: 65,536 prototypes, teacher momentum 0.996,
teacher temperature 0.04, 8 local crops, 10 warm-up epochs), or `small-data`, settings for short runs on a few thousand
images (the README demo's: 1,024 prototypes and a smaller head, teacher momentum 0.99, learning rate 0.002 per 256
images, 1 warm-up epoch, 4 local crops).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agriclip.errors import run_command
from training.options import (
    RESUME_HINT,
    ImageColumnOption,
    LoopOptions,
    ModelOption,
    option,
    options_parser,
    parse_options,
    redefault,
)


# The settings that `--recipe` names. A learning rate of None is the optimizer's published one (ViTs: AdamW at 5e-4,
# the ResNet-50: SGD at 0.03, per 256 images; `training.distillation.OPTIMIZER_RECIPES`).
PUBLISHED = {
    "out_dim": 65536,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "num_local_crops": 8,
    "student_temp": 0.1,
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "center_momentum": 0.9,
    "momentum_teacher": 0.996,
    "freeze_last_layer_epochs": 1,
    "learning_rate": None,
    "warmup_epochs": 10,
}
RECIPES = {
    "published": PUBLISHED,
    # A run of a few hundred steps on a few thousand images (the README demo's settings): far fewer prototypes than
    # images, and a teacher momentum at which the teacher leaves its initialisation within the run (at the published
    # 0.996 it barely does). The learning rate applies to either optimizer.
    "small-data": {
        **PUBLISHED,
        "out_dim": 1024,
        "head_hidden_dim": 256,
        "head_bottleneck_dim": 64,
        "num_local_crops": 4,
        "momentum_teacher": 0.99,
        "learning_rate": 0.002,
        "warmup_epochs": 1,
    },
}
DEFAULT_RECIPE = "published"


def _recipe_default(name: str) -> str:
    """The help's account of a recipe setting's default: its value in each recipe."""

    def shown(value):
        return "by optimizer (adamw 5e-4, sgd 0.03)" if value is None else f"{value:g}"

    return "default: from --recipe: " + ", ".join(
        f"{recipe} {shown(values[name])}" for recipe, values in RECIPES.items()
    )


def apply_recipe(options: DinoOptions) -> DinoOptions:
    """`options` with every recipe setting that no flag (or `--config` value) gave taken from `options.recipe`."""
    table = RECIPES[options.recipe]
    return dataclasses.replace(
        options, **{name: value for name, value in table.items() if getattr(options, name) is None}
    )


def recipe_settings(args, resolved_defaults: dict | None = None) -> tuple[dict, dict]:
    """The recipe settings of `args` as the run uses them, and those of them that differ from the recipe's values.

    A setting the table leaves None (the published learning rate: the optimizer's) is compared with its value in
    `resolved_defaults` when given there, else never counted as different."""
    table = {
        **RECIPES[args.recipe],
        **{
            name: value
            for name, value in (resolved_defaults or {}).items()
            if RECIPES[args.recipe].get(name, 0) is None
        },
    }
    values = {name: getattr(args, name) for name in table}
    changed = {name: value for name, value in values.items() if table[name] is not None and value != table[name]}
    return values, changed


KNN = "k-NN evaluation of the teacher's features (DINO's protocol)"
CROPS = "multi-crop"
HEAD = "DINO head and loss"
OPTIMISATION = "optimisation"


@dataclass(kw_only=True)
class DinoOptions(LoopOptions, ImageColumnOption, ModelOption):
    """The options of stage 2. Those left None that `--recipe` names are filled in by `apply_recipe`, the crop recipe
    and optimizer by the backbone's family (`training.distillation.resolve_recipe`)."""

    backbone: str | None = option(
        "Start from the weights of this transformers ViT/DINOv2/ResNet/ConvNeXt checkpoint (folder or Hub id; same "
        "architecture as the model's backbone).",
        None,
    )
    random_init: bool = option("Start the backbone from random initialisation.", False)
    train_data: str = option(
        "Images: any image-caption source (captions are neither needed nor read), or a folder of "
        "image files (in split subfolders train/, validation/ where it has them)."
    )
    train_split: str = option("Split of --train-data.", "train")
    recipe: str = option(
        "The DINO settings a flag does not give: published (DINO's published ViT settings) or small-data (short "
        "runs on a few thousand images, as the README demo). The flags marked 'from --recipe' below override it "
        f"one by one (default: {DEFAULT_RECIPE}).",
        DEFAULT_RECIPE,
        choices=sorted(RECIPES),
    )
    knn_data: str | None = option(
        "Labelled images: an image folder of class folders (optionally in split folders, e.g. train/ "
        "and test/) or a datasets dataset with a ClassLabel column.",
        None,
        group=KNN,
    )
    knn_bank_split: str | None = option(
        "Split of --knn-data whose features form the memory bank, e.g. train (default: none, a "
        "seeded half of --knn-data; give --knn-query-split with it).",
        None,
        group=KNN,
    )
    knn_query_split: str | None = option(
        "Split of --knn-data whose images are classified by the bank, e.g. test or validation "
        "(default: none, the other half).",
        None,
        group=KNN,
    )
    knn_k: int = option("Neighbours of the k-NN vote.", 20, group=KNN)
    crop_recipe: Literal["vit", "resnet"] | None = option(
        "Crop scales of the published recipe (default: by backbone type).", None, group=CROPS
    )
    global_size: int | None = option("Global crop size (default: the model's image size).", None, group=CROPS)
    local_size: int | None = option("Local crop size (default: 3/7 of the global size, 96 for 224).", None, group=CROPS)
    photometric: Literal["dino", "colour"] = option(
        "Colour operations of the views: dino (the published jitter of brightness, contrast, saturation and hue, "
        "grayscale, solarisation) or colour (brightness and contrast only: for data whose colour is the class).",
        "dino",
        group=CROPS,
    )
    num_local_crops: int | None = option(
        f"Local crops per image ({_recipe_default('num_local_crops')}).", None, group=CROPS
    )
    out_dim: int | None = option(f"Prototypes of the DINO head ({_recipe_default('out_dim')}).", None, group=HEAD)
    head_hidden_dim: int | None = option(
        f"Hidden size of the head's MLP ({_recipe_default('head_hidden_dim')}).", None, group=HEAD
    )
    head_bottleneck_dim: int | None = option(
        f"Bottleneck size before the weight-normalised last layer ({_recipe_default('head_bottleneck_dim')}).",
        None,
        group=HEAD,
    )
    norm_last_layer: bool = option(
        "Let the last layer's weight norm train (DINO's option for stability with ViT-B).",
        True,
        flag="--no-norm-last-layer",
        group=HEAD,
    )
    freeze_last_layer_epochs: int | None = option(
        "Epochs (of optimizer steps) during which the head's last layer stays fixed "
        f"({_recipe_default('freeze_last_layer_epochs')}).",
        None,
        group=HEAD,
    )
    student_temp: float | None = option(
        f"Student softmax temperature ({_recipe_default('student_temp')}).", None, group=HEAD
    )
    teacher_temp: float | None = option(
        f"Teacher softmax temperature after warm-up ({_recipe_default('teacher_temp')}).", None, group=HEAD
    )
    warmup_teacher_temp: float | None = option(
        f"Teacher temperature at the start of the warm-up ({_recipe_default('warmup_teacher_temp')}).",
        None,
        group=HEAD,
    )
    warmup_teacher_temp_epochs: int | None = option(
        "Epochs (of optimizer steps, at most the run) of linear teacher-temperature warm-up, per step "
        f"({_recipe_default('warmup_teacher_temp_epochs')}).",
        None,
        group=HEAD,
    )
    center_momentum: float | None = option(
        f"Momentum of the centre of the teacher outputs ({_recipe_default('center_momentum')}).", None, group=HEAD
    )
    koleo_weight: float = option(
        "Weight of DINOv2's KoLeo regulariser (Oquab et al. 2023), added to the loss: it spreads the student's "
        "pooled backbone features of each global crop uniformly over the batch, against features that bunch "
        "together as a teacher's outputs stay uniform or collapse in short runs. 0 (the default) is the "
        "published DINO, which has no such term; DINOv2 uses 0.1. Needs --batch-size of at least 2.",
        0.0,
        group=HEAD,
    )
    momentum_teacher: float | None = option(
        "Teacher EMA momentum at the start; a cosine over the run's optimizer steps takes it to 1 "
        f"({_recipe_default('momentum_teacher')}).",
        None,
        group=HEAD,
    )
    optimizer: Literal["adamw", "sgd"] | None = option(
        "adamw (ViT recipe) or sgd (ResNet-50 recipe); default by backbone type.", None, group=OPTIMISATION
    )
    learning_rate: float | None = option(
        "Peak learning rate per 256 images: the run's peak is this x total batch (batch size x processes x "
        f"accumulation) / 256, as the start-up banner prints ({_recipe_default('learning_rate')}).",
        None,
        group=OPTIMISATION,
    )
    min_learning_rate: float = option("Learning rate at the end of the cosine decay.", 1e-6, group=OPTIMISATION)
    warmup_epochs: int | None = option(
        "Linear learning-rate warm-up, in epochs of optimizer steps (at most the whole run; "
        f"{_recipe_default('warmup_epochs')}).",
        None,
        group=OPTIMISATION,
    )
    warmup_steps: int | None = option(
        "Linear learning-rate warm-up in optimizer steps; when given, it replaces --warmup-epochs.",
        None,
        group=OPTIMISATION,
    )
    weight_decay: float | None = option(
        "Weight decay at the start (default: the optimizer's published value, adamw 0.04, sgd 1e-4).",
        None,
        group=OPTIMISATION,
    )
    weight_decay_end: float | None = option(
        "Weight decay at the end of a cosine over the run's optimizer steps (default: the optimizer's published "
        "value, adamw 0.4, sgd 1e-4).",
        None,
        group=OPTIMISATION,
    )
    collapse_window: int | None = option(
        "Stop when the teacher looks collapsed for this many consecutive steps (default: the learning-rate warm-up "
        "steps plus a tenth of the run's steps, at least 100).",
        None,
        group=OPTIMISATION,
    )
    batch_size: int = redefault(LoopOptions, "batch_size", 64)
    max_grad_norm: float = redefault(LoopOptions, "max_grad_norm", 3.0)
    epochs: int = redefault(LoopOptions, "epochs", 100)

    def __post_init__(self):
        if (self.knn_bank_split is None) != (self.knn_query_split is None):
            raise ValueError(
                "--knn-bank-split and --knn-query-split go together (or leave both out to split --knn-data in halves)"
            )
        if self.knn_bank_split and not self.knn_data:
            raise ValueError("--knn-bank-split and --knn-query-split name splits of --knn-data: give --knn-data")
        if not (math.isfinite(self.koleo_weight) and self.koleo_weight >= 0):
            raise ValueError(f"--koleo-weight must be a finite number of at least 0, got {self.koleo_weight:g}")
        if self.koleo_weight > 0 and self.batch_size < 2:
            raise ValueError(
                "--koleo-weight needs --batch-size of at least 2: KoLeo measures each feature's nearest neighbour "
                "in the batch"
            )


def build_parser():
    """The command-line parser of stage 2 (its --help)."""
    return options_parser(DinoOptions, f"python -m {__spec__.name}", __doc__)


def parse_command_line(argv: list[str] | None = None) -> DinoOptions:
    """The options of `argv` (default: the command line), checked, with the recipe's settings filled in where no flag
    gave them; exits with argparse's usage error on a bad combination."""
    return apply_recipe(parse_options(DinoOptions, argv, prog=f"python -m {__spec__.name}", description=__doc__))


def run(options: DinoOptions, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2; `resume_hint` says how to continue a stopped run in the caller's context (`training.run_all`
    resumes by itself)."""
    # The heavy stack loads only here: --help and argument errors answer at once.
    from training.distillation import run

    return run(apply_recipe(options), resume_hint)


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with the options of `argv` (default: the command line)."""
    return run(parse_command_line(argv), resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
