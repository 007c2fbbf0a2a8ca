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

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agriclip.errors import run_command
from training.options import (
    RESUME_HINT,
    ColumnOptions,
    LoopOptions,
    ModelOption,
    option,
    options_parser,
    parse_options,
    redefault,
)


@dataclass(kw_only=True)
class LoraOptions(LoopOptions, ColumnOptions, ModelOption):
    """The options of a LoRA adaptation."""

    towers: tuple[Literal["text", "image", "backbone"], ...] = option("Tower(s) that get LoRA adapters.", ("backbone",))
    target_modules: str | None = option(
        "Regex over whole module names replacing the towers' default targets; it must hit every chosen tower and "
        "nothing else.",
        None,
    )
    lora_rank: int = option("LoRA rank r.", 8)
    lora_alpha: float = option("LoRA scaling numerator (the update is scaled by alpha / r).", 16.0)
    lora_dropout: float = option("Dropout on the LoRA input.", 0.0)
    train_aligner: bool = option("Also train the aligner fully (saved with the adapter).", False)
    refit_aligner: bool = option(
        "After training, re-fit the aligner in closed form (stage 3) from the adapted backbone to the CLIP "
        "image embeddings of the training images (saved with the adapter).",
        False,
    )
    aligner_ridge: float = option("Ridge penalty of the aligner re-fit.", 0.0)
    objective: Literal["classification", "contrastive"] = option(
        "Cross-entropy against class-prompt embeddings on labelled images, or InfoNCE on image-caption pairs.",
        "classification",
    )
    train_data: str | None = option(
        "classification: labelled images (one subfolder per class, or a datasets dataset with a ClassLabel "
        "column); contrastive: image-caption pairs.",
        None,
    )
    train_split: str | None = option(
        "Split to train on (contrastive default: train; classification default: a seeded stratified half "
        "of the evaluated split).",
        None,
    )
    eval_split: str | None = option("Split of the labelled data held out for evaluation.", None)
    eval_data: str | None = option(
        "contrastive only: labelled images to measure zero-shot accuracy on before and after adaptation.", None
    )
    suite: str | None = option(
        "Evaluation suite YAML whose --task gives the labelled data, class prompt names and templates.", None
    )
    task: str | None = option("Name of the --suite dataset to adapt to or evaluate on.", None)
    templates: tuple[str, ...] = option(
        "Prompt templates of the classes: a name from training.prompts (e.g. crop, leaf, fish, livestock) "
        "or templates with '{}'.",
        ("default",),
    )
    shots: int | None = option(
        "classification: train on K images per class (seeded sample of the training split).", None
    )
    eval_every: int = option("Evaluate on the held-out images every N optimizer steps (0: only at the end).", 0)
    learning_rate: float = option("Peak learning rate (AdamW).", 1e-3)
    min_learning_rate: float = option("Learning rate at the end of the cosine decay.", 0.0)
    warmup_steps: int = option(
        "Linear warm-up optimizer steps before the cosine decay: step i of n takes the peak x (i + 1) / n.", 0
    )
    weight_decay: float = option("AdamW weight decay (none on biases and norms).", 0.01)
    merge: bool = option("Also write <output-dir>/merged: the adapter merged into a plain AgriCLIP folder.", False)
    base_model_id: str | None = option(
        "Hub id (org/name) of the base model, recorded in the adapter instead of a local folder; required to publish.",
        None,
    )
    push_to_hub: str | None = option("Publish the adapter to this Hub repository.", None, metavar="REPO_ID")
    epochs: int = redefault(LoopOptions, "epochs", 20)
    batch_size: int = redefault(LoopOptions, "batch_size", 16)
    checkpoint_every: int = redefault(LoopOptions, "checkpoint_every", 50)

    def __post_init__(self):
        # Flag combinations that cannot work are refused before anything is loaded.
        if bool(self.suite) != bool(self.task):
            raise ValueError("--suite and --task go together")
        if self.objective == "classification":
            if bool(self.train_data) == bool(self.suite):
                raise ValueError("classification needs either --train-data (labelled images) or --suite/--task")
            if self.eval_data:
                raise ValueError(
                    "--eval-data is for the contrastive objective; classification holds out --eval-split or half "
                    "of its data"
                )
            if self.image_column or self.caption_column:
                raise ValueError(
                    "--image-column and --caption-column name columns of image-caption pairs (the contrastive "
                    "objective); classification reads class folders or a ClassLabel column"
                )
        else:
            if not self.train_data:
                raise ValueError("contrastive needs --train-data (image-caption pairs)")
            if self.shots:
                raise ValueError("--shots applies to the classification objective")
            if self.eval_data and self.suite:
                raise ValueError("give --eval-data or --suite/--task, not both")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"--shots must be at least 1, got {self.shots}")
        if self.refit_aligner and "backbone" not in self.towers:
            raise ValueError("--refit-aligner re-fits the aligner to an adapted backbone: add backbone to --towers")


def build_parser():
    """The command-line parser of the LoRA adaptation (its --help)."""
    return options_parser(LoraOptions, f"python -m {__spec__.name}", __doc__)


def run(options: LoraOptions, resume_hint: str = RESUME_HINT) -> Path:
    """Runs the LoRA adaptation; `resume_hint` says how to continue a stopped run in the caller's context."""
    # The heavy stack loads only here: --help and argument errors answer at once.
    from training.lora import run

    return run(options, resume_hint)


def main(argv: list[str] | None = None, resume_hint: str = RESUME_HINT) -> Path:
    """Runs the LoRA adaptation with the options of `argv` (default: the command line)."""
    return run(parse_options(LoraOptions, argv, prog=f"python -m {__spec__.name}", description=__doc__), resume_hint)


if __name__ == "__main__":
    run_command(main, __spec__.name)
