"""Stage 2 of AgriCLIP: DINO self-distillation of the fine-grained image backbone, with no labels.

A student (backbone + DINO head) sees 2 global and N local crops of each image; a teacher, the exponential
moving average of the student, sees the global crops; the student learns to match the teacher's centred,
sharpened outputs (Caron et al. 2021, as in facebookresearch/dino main_dino.py). Multi-crop augmentation runs
batched on the training device (kornia). Runs the same under `python` and `accelerate launch`:

    python -m training.stage2_dino --model runs/stage1/final --train-data data/pretrain --output-dir runs/stage2

Writes the trained teacher backbone into the AgriCLIP checkpoint (`<output-dir>/final`) and as a standalone
transformers model (`<output-dir>/backbone`).
"""

from __future__ import annotations

from pathlib import Path

from training.options import RESUME_HINT, add_model_argument, add_runtime_arguments, parse_args, script_parser


def build_parser():
    parser = script_parser(__spec__.name, __doc__)
    add_model_argument(parser)
    parser.add_argument("--backbone", default=None, help="Start from the weights of this transformers ViT/DINOv2/ResNet checkpoint (folder or Hub id; same architecture as the model's backbone).")
    parser.add_argument("--random-init", action="store_true", help="Start the backbone from random initialisation.")
    parser.add_argument("--train-data", required=True, help="Images: any image-caption source (captions are ignored) or image folder with metadata.")
    parser.add_argument("--train-split", default="train", help="Split of --train-data.")
    parser.add_argument("--knn-data", default=None, help="Labelled image folder or dataset for the k-NN accuracy of the teacher's features (split in halves).")
    parser.add_argument("--knn-k", type=int, default=20, help="Neighbours of the k-NN vote.")
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
    head.add_argument("--freeze-last-layer-epochs", type=int, default=1, help="Epochs during which the head's last layer stays fixed.")
    head.add_argument("--student-temp", type=float, default=0.1, help="Student softmax temperature.")
    head.add_argument("--teacher-temp", type=float, default=0.04, help="Teacher softmax temperature after warm-up.")
    head.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="Teacher temperature at the start of the warm-up.")
    head.add_argument("--warmup-teacher-temp-epochs", type=int, default=0, help="Epochs of linear teacher-temperature warm-up.")
    head.add_argument("--center-momentum", type=float, default=0.9, help="Momentum of the centre of the teacher outputs.")
    head.add_argument("--momentum-teacher", type=float, default=0.996, help="Teacher EMA momentum at the start; a cosine takes it to 1.")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="adamw (ViT recipe) or sgd (ResNet-50 recipe); default by backbone type.")
    optim.add_argument("--learning-rate", type=float, default=None, help="Peak learning rate per 256 images (linearly scaled by the total batch); default from the recipe.")
    optim.add_argument("--min-learning-rate", type=float, default=1e-6, help="Learning rate at the end of the cosine decay.")
    optim.add_argument("--warmup-epochs", type=int, default=10, help="Linear learning-rate warm-up epochs (capped at --epochs).")
    optim.add_argument("--weight-decay", type=float, default=None, help="Weight decay at the start (default from the recipe).")
    optim.add_argument("--weight-decay-end", type=float, default=None, help="Weight decay at the end, cosine schedule (default from the recipe).")
    optim.add_argument("--collapse-window", type=int, default=100, help="Stop when the teacher looks collapsed for this many consecutive steps.")
    add_runtime_arguments(parser)
    parser.set_defaults(batch_size=64, max_grad_norm=3.0, epochs=100)
    return parser


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs stage 2 with `argv` (default: the command line); `resume_hint` says how to continue a stopped run in
    the caller's context (`training.run_all` resumes by itself)."""
    args = parse_args(build_parser(), argv)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.distillation import run

    return run(args, resume_hint)


if __name__ == "__main__":
    main()
