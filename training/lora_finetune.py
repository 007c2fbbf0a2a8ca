"""Adapting AgriCLIP to a farm's own photos with LoRA (PEFT): low-rank adapters on one tower, the rest frozen.

Runs the same under `python` and `accelerate launch`:

    python -m training.lora_finetune --model org/agriclip --train-data my_crops/ --templates crop \\
        --towers backbone --shots 16 --output-dir runs/lora --merge
    accelerate launch -m training.lora_finetune --config lora.yaml

Towers and the modules their adapters go on by default (`--target-modules REGEX` replaces these; PEFT matches it
against whole module names, and attention layers of different towers share names in transformers 5, so the regex
is checked against the chosen towers):

    text      text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj
    image     vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj           (the CLIP image tower)
    backbone  ViT / DINOv2: dino_model.<...>.attention.{q,k,v,o}_proj
              ResNet (no attention): the convolutions of the residual blocks, dino_model.encoder.stages.S.layers.L.layer.I.convolution
              (stem and shortcut projections stay frozen)

The image embedding trained and evaluated follows the adapted towers: the backbone trains through the aligned
embedding, the CLIP image tower through "clip", both through "fused"; text alone uses the configured one.

Objectives:
- classification (labelled images): cross-entropy over `exp(logit_scale) * image_embeds @ class_embeds.T`, the
  class embeddings being prompt ensembles of the (possibly adapted) text tower, as the zero-shot classifier builds
  them;
- contrastive (image-caption pairs): CLIP's symmetric InfoNCE on the global batch, as stage 1.

Held-out evaluation (zero-shot top-1 of the base model against the adapted one, in `<output-dir>/results.json`):
with the classification objective, the images of `--eval-split`; without `--train-split`, a seeded stratified half
of the labelled data is held out and training uses the other half (the evaluation suite's protocol). `--shots K`
then keeps K training images per class (seeded). With the contrastive objective, `--eval-data` or `--suite/--task`.

Outputs: `<output-dir>/adapter` (adapter_config.json + adapter_model.safetensors, loadable with
`PeftModel.from_pretrained` and by `pipeline("zero-shot-image-classification", model=...)`), `<output-dir>/merged`
with `--merge` (a plain AgriCLIP folder with the processor). Checkpoints hold the trainable weights only: the frozen
base comes back from `--model` on resume.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__spec__.name, __doc__)
    add_model_argument(parser)
    parser.add_argument(
        "--towers",
        nargs="+",
        choices=["text", "image", "backbone"],
        default=["backbone"],
        help="Tower(s) that get LoRA adapters.",
    )
    parser.add_argument(
        "--target-modules",
        default=None,
        help="Regex over whole module names replacing the towers' default targets; it must hit every chosen tower and nothing else.",
    )
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r.")
    parser.add_argument(
        "--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (the update is scaled by alpha / r)."
    )
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    parser.add_argument(
        "--train-aligner", action="store_true", help="Also train the aligner fully (saved with the adapter)."
    )
    parser.add_argument(
        "--refit-aligner",
        action="store_true",
        help="After training, re-fit the aligner in closed form (stage 3) from the adapted backbone to the CLIP "
        "image embeddings of the training images (saved with the adapter).",
    )
    parser.add_argument("--aligner-ridge", type=float, default=0.0, help="Ridge penalty of the aligner re-fit.")
    parser.add_argument(
        "--objective",
        choices=["classification", "contrastive"],
        default="classification",
        help="Cross-entropy against class-prompt embeddings on labelled images, or InfoNCE on image-caption pairs.",
    )
    parser.add_argument(
        "--train-data",
        default=None,
        help="classification: labelled images (one subfolder per class, or a datasets dataset with a ClassLabel "
        "column); contrastive: image-caption pairs.",
    )
    add_column_arguments(parser)
    parser.add_argument(
        "--train-split",
        default=None,
        help="Split to train on (contrastive default: train; classification default: a seeded stratified half "
        "of the evaluated split).",
    )
    parser.add_argument("--eval-split", default=None, help="Split of the labelled data held out for evaluation.")
    parser.add_argument(
        "--eval-data",
        default=None,
        help="contrastive only: labelled images to measure zero-shot accuracy on before and after adaptation.",
    )
    parser.add_argument(
        "--suite",
        default=None,
        help="Evaluation suite YAML whose --task gives the labelled data, class prompt names and templates.",
    )
    parser.add_argument("--task", default=None, help="Name of the --suite dataset to adapt to or evaluate on.")
    parser.add_argument(
        "--templates",
        nargs="+",
        default=["default"],
        help="Prompt templates of the classes: a name from training.prompts (e.g. crop, leaf, fish, livestock) "
        "or templates with '{}'.",
    )
    parser.add_argument(
        "--shots",
        type=int,
        default=None,
        help="classification: train on K images per class (seeded sample of the training split).",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="Evaluate on the held-out images every N optimizer steps (0: only at the end).",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Peak learning rate (AdamW).")
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
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay (none on biases and norms)."
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="Also write <output-dir>/merged: the adapter merged into a plain AgriCLIP folder.",
    )
    parser.add_argument(
        "--base-model-id",
        default=None,
        help="Hub id (org/name) of the base model, recorded in the adapter instead of a local folder; required to publish.",
    )
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="Publish the adapter to this Hub repository."
    )
    add_runtime_arguments(parser)
    parser.set_defaults(epochs=20, batch_size=16, checkpoint_every=50)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects flag combinations that cannot work before anything is loaded."""
    if bool(args.suite) != bool(args.task):
        parser.error("--suite and --task go together")
    if args.objective == "classification":
        if bool(args.train_data) == bool(args.suite):
            parser.error("classification needs either --train-data (labelled images) or --suite/--task")
        if args.eval_data:
            parser.error(
                "--eval-data is for the contrastive objective; classification holds out --eval-split or half of its data"
            )
        if args.image_column or args.caption_column:
            parser.error(
                "--image-column and --caption-column name columns of image-caption pairs (the contrastive "
                "objective); classification reads class folders or a ClassLabel column"
            )
    else:
        if not args.train_data:
            parser.error("contrastive needs --train-data (image-caption pairs)")
        if args.shots:
            parser.error("--shots applies to the classification objective")
        if args.eval_data and args.suite:
            parser.error("give --eval-data or --suite/--task, not both")
    if args.shots is not None and args.shots < 1:
        parser.error(f"--shots must be at least 1, got {args.shots}")
    if args.refit_aligner and "backbone" not in args.towers:
        parser.error("--refit-aligner re-fits the aligner to an adapted backbone: add backbone to --towers")


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs the LoRA adaptation with `argv` (default: the command line); `resume_hint` says how to continue a
    stopped run in the caller's context."""
    parser = build_parser()
    args = parse_args(parser, argv)
    check_arguments(parser, args)
    # The heavy stack loads only once the options are valid: --help and argument errors answer at once.
    from training.lora import run

    return run(args, resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
