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

import argparse
import math
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


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every recipe setting that no flag (or `--config` value) gave from the table of `args.recipe`."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def recipe_settings(args: argparse.Namespace, resolved_defaults: dict | None = None) -> tuple[dict, dict]:
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


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    add_model_argument(parser)
    parser.add_argument(
        "--backbone",
        default=None,
        help="Start from the weights of this transformers ViT/DINOv2/ResNet/ConvNeXt checkpoint (folder or Hub id; same architecture as the model's backbone).",
    )
    parser.add_argument("--random-init", action="store_true", help="Start the backbone from random initialisation.")
    parser.add_argument(
        "--train-data",
        required=True,
        help="Images: any image-caption source (captions are neither needed nor read), or a folder of "
        "image files (in split subfolders train/, validation/ where it has them).",
    )
    parser.add_argument("--train-split", default="train", help="Split of --train-data.")
    add_column_arguments(parser, captions=False)
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help="The DINO settings a flag does not give: published (DINO's published ViT settings) or small-data (short "
        "runs on a few thousand images, as the README demo). The flags marked 'from --recipe' below override it "
        f"one by one (default: {DEFAULT_RECIPE}).",
    )
    knn = parser.add_argument_group("k-NN evaluation of the teacher's features (DINO's protocol)")
    knn.add_argument(
        "--knn-data",
        default=None,
        help="Labelled images: an image folder of class folders (optionally in split folders, e.g. train/ "
        "and test/) or a datasets dataset with a ClassLabel column.",
    )
    knn.add_argument(
        "--knn-bank-split",
        default=None,
        help="Split of --knn-data whose features form the memory bank, e.g. train (default: none, a "
        "seeded half of --knn-data; give --knn-query-split with it).",
    )
    knn.add_argument(
        "--knn-query-split",
        default=None,
        help="Split of --knn-data whose images are classified by the bank, e.g. test or validation "
        "(default: none, the other half).",
    )
    knn.add_argument("--knn-k", type=int, default=20, help="Neighbours of the k-NN vote.")
    crops = parser.add_argument_group("multi-crop")
    crops.add_argument(
        "--crop-recipe",
        choices=["vit", "resnet"],
        default=None,
        help="Crop scales of the published recipe (default: by backbone type).",
    )
    crops.add_argument(
        "--global-size", type=int, default=None, help="Global crop size (default: the model's image size)."
    )
    crops.add_argument(
        "--local-size", type=int, default=None, help="Local crop size (default: 3/7 of the global size, 96 for 224)."
    )
    crops.add_argument(
        "--photometric",
        choices=["dino", "colour"],
        default="dino",
        help="Colour operations of the views: dino (the published jitter of brightness, contrast, saturation and hue, "
        "grayscale, solarisation) or colour (brightness and contrast only: for data whose colour is the class).",
    )
    crops.add_argument(
        "--num-local-crops",
        type=int,
        default=None,
        help=f"Local crops per image ({_recipe_default('num_local_crops')}).",
    )
    head = parser.add_argument_group("DINO head and loss")
    head.add_argument(
        "--out-dim", type=int, default=None, help=f"Prototypes of the DINO head ({_recipe_default('out_dim')})."
    )
    head.add_argument(
        "--head-hidden-dim",
        type=int,
        default=None,
        help=f"Hidden size of the head's MLP ({_recipe_default('head_hidden_dim')}).",
    )
    head.add_argument(
        "--head-bottleneck-dim",
        type=int,
        default=None,
        help=f"Bottleneck size before the weight-normalised last layer ({_recipe_default('head_bottleneck_dim')}).",
    )
    head.add_argument(
        "--no-norm-last-layer",
        dest="norm_last_layer",
        action="store_false",
        help="Let the last layer's weight norm train (DINO's option for stability with ViT-B).",
    )
    head.add_argument(
        "--freeze-last-layer-epochs",
        type=int,
        default=None,
        help=f"Epochs (of optimizer steps) during which the head's last layer stays fixed ({_recipe_default('freeze_last_layer_epochs')}).",
    )
    head.add_argument(
        "--student-temp",
        type=float,
        default=None,
        help=f"Student softmax temperature ({_recipe_default('student_temp')}).",
    )
    head.add_argument(
        "--teacher-temp",
        type=float,
        default=None,
        help=f"Teacher softmax temperature after warm-up ({_recipe_default('teacher_temp')}).",
    )
    head.add_argument(
        "--warmup-teacher-temp",
        type=float,
        default=None,
        help=f"Teacher temperature at the start of the warm-up ({_recipe_default('warmup_teacher_temp')}).",
    )
    head.add_argument(
        "--warmup-teacher-temp-epochs",
        type=int,
        default=None,
        help=f"Epochs (of optimizer steps, at most the run) of linear teacher-temperature warm-up, per step ({_recipe_default('warmup_teacher_temp_epochs')}).",
    )
    head.add_argument(
        "--center-momentum",
        type=float,
        default=None,
        help=f"Momentum of the centre of the teacher outputs ({_recipe_default('center_momentum')}).",
    )
    head.add_argument(
        "--koleo-weight",
        type=float,
        default=0.0,
        help="Weight of DINOv2's KoLeo regulariser (Oquab et al. 2023), added to the loss: it spreads the student's "
        "pooled backbone features of each global crop uniformly over the batch, against features that bunch "
        "together as a teacher's outputs stay uniform or collapse in short runs. 0 (the default) is the "
        "published DINO, which has no such term; DINOv2 uses 0.1. Needs --batch-size of at least 2.",
    )
    head.add_argument(
        "--momentum-teacher",
        type=float,
        default=None,
        help=f"Teacher EMA momentum at the start; a cosine over the run's optimizer steps takes it to 1 ({_recipe_default('momentum_teacher')}).",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default=None,
        help="adamw (ViT recipe) or sgd (ResNet-50 recipe); default by backbone type.",
    )
    optim.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help=f"Peak learning rate per 256 images: the run's peak is this x total batch (batch size x processes x accumulation) / 256, as the start-up banner prints ({_recipe_default('learning_rate')}).",
    )
    optim.add_argument(
        "--min-learning-rate", type=float, default=1e-6, help="Learning rate at the end of the cosine decay."
    )
    optim.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help=f"Linear learning-rate warm-up, in epochs of optimizer steps (at most the whole run; {_recipe_default('warmup_epochs')}).",
    )
    optim.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="Linear learning-rate warm-up in optimizer steps; when given, it replaces --warmup-epochs.",
    )
    optim.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="Weight decay at the start (default: the optimizer's published value, adamw 0.04, sgd 1e-4).",
    )
    optim.add_argument(
        "--weight-decay-end",
        type=float,
        default=None,
        help="Weight decay at the end of a cosine over the run's optimizer steps (default: the optimizer's published value, adamw 0.4, sgd 1e-4).",
    )
    optim.add_argument(
        "--collapse-window",
        type=int,
        default=None,
        help="Stop when the teacher looks collapsed for this many consecutive steps (default: the learning-rate warm-up steps plus a tenth of the run's steps, at least 100).",
    )
    add_runtime_arguments(parser)
    parser.set_defaults(batch_size=64, max_grad_norm=3.0, epochs=100)
    return parser


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of `argv` (default: the command line), checked, with the recipe's settings filled in where no flag
    gave them; exits with argparse's usage error on a bad combination."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if (args.knn_bank_split is None) != (args.knn_query_split is None):
        parser.error(
            "--knn-bank-split and --knn-query-split go together (or leave both out to split --knn-data in halves)"
        )
    if args.knn_bank_split and not args.knn_data:
        parser.error("--knn-bank-split and --knn-query-split name splits of --knn-data: give --knn-data")
    if not (math.isfinite(args.koleo_weight) and args.koleo_weight >= 0):
        parser.error(f"--koleo-weight must be a finite number of at least 0, got {args.koleo_weight:g}")
    if args.koleo_weight > 0 and args.batch_size < 2:
        parser.error(
            "--koleo-weight needs --batch-size of at least 2: KoLeo measures each feature's nearest neighbour "
            "in the batch"
        )
    return apply_recipe(args)


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with `argv` (default: the command line); `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    args = parse_options(argv)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.distillation import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
