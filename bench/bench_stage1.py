"""Stage-1 training throughput against bare CLIPModel training loops, measured in the same run.

Ours: the stage-1 script's update (`training.contrastive.contrastive_forward` and `training.runtime.train_step`
under an Accelerator: AgriCLIP forward through the CLIP towers, global-batch InfoNCE, finite-loss check, clipping,
AdamW with parameter groups on torch's fused kernel as the stage-1 script builds it, `training.runtime.adamw`).

References, each `transformers.CLIPModel(return_loss=True)` with the same tower sizes, batches, parameter groups and
AdamW settings, in the loop a user writes (forward, backward, `torch.nn.utils.clip_grad_norm_`, step, zero_grad):

- "bare loop, default AdamW": torch's default AdamW kernel, which on the CPU is a Python loop over the tensors;
- "bare loop, fused AdamW": the optimizer ours builds (`training.runtime.adamw`), so that the ratio shows what the
  project's step costs or saves beyond the choice of kernel.

The model (`--model`): `small` (the default: every tower 256 wide and 4 layers deep, 224 px images in 16 px
patches, CLIP's 77-token context: as at real sizes, the towers' compute dominates the step, not the fixed costs
per step that dominate the tiny preset's), a preset (`vit_b16`: the real tower sizes; a few steps suffice), or a JSON
file of AgriCLIPConfig values over a preset, as the training scripts' `--model` takes them. Batches come out of
stage 1's collator (`training.data.ImageTextCollator` with the model's processor): photos resized and cropped to
the model's image size, captions of 8 to 40 words tokenised, padded to the longest of the batch and truncated at
the context, as in training.

Every contender trains on the same pre-made batches (data loading is benchmarked in bench_loading.py); their steps
alternate, so that load from other processes (and the CPU's clock) hits all alike. Prints each side's samples per
second (min / median / max over the timed steps), then against each reference the ratio of the medians, the paired
ratios (ours against the reference on the same batch, one step after the other: min / median / max) and each
round's ratio of total time. Target: ours >= 1.0x each reference.

    python bench/bench_stage1.py [--model small|tiny|vit_b16|FILE.json] [--batch-size 32] [--steps 10] [--rounds 3]
"""

import argparse
import statistics
import time

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.convert import PRESETS
from training.contrastive import contrastive_forward, trainable_clip
from training.data import ImageTextCollator
from training.dino import param_groups_without_decay
from training.losses import ContrastiveLoss
from training.models import config_from_file
from training.runtime import CheckpointManager, TrainingPosition, adamw, train_step


# Stage 1's recipe (training.stage1_contrastive's defaults).
LEARNING_RATE, WEIGHT_DECAY, BETAS, EPS, MAX_GRAD_NORM = 5e-5, 0.2, (0.9, 0.98), 1e-6, 1.0
SMALL_TOWER = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
WORDS = (
    "leaf",
    "tomato",
    "wheat",
    "rust",
    "spots",
    "brown",
    "yellow",
    "lesions",
    "field",
    "close",
    "up",
    "of",
    "a",
    "with",
    "healthy",
    "blight",
    "mildew",
    "powdery",
    "white",
    "on",
    "the",
    "plant",
    "crop",
    "green",
    "edges",
    "young",
    "cattle",
    "fish",
    "fresh",
    "soil",
    "weeds",
    "rows",
    "in",
    "photo",
    "showing",
    "small",
    "dark",
)


def small_config() -> AgriCLIPConfig:
    """The default model: the tiny preset's layout with every tower (text, CLIP image, DINO ViT) 256 wide and 4 deep,
    the image towers on 224 px images in 16 px patches."""
    values = AgriCLIPConfig.tiny(image_size=224).to_dict()
    for tower in ("text_config", "vision_config", "dino_config"):
        values[tower].update(SMALL_TOWER)
    values["dino_config"]["patch_size"] = 16
    values["projection_dim"] = SMALL_TOWER["hidden_size"]
    return AgriCLIPConfig.from_dict(values)


def bench_config(model: str) -> AgriCLIPConfig:
    """`small`, a preset name, or a JSON file of config values over a preset (`training.models.config_from_file`)."""
    if model == "small":
        return small_config()
    return PRESETS[model]() if model in PRESETS else config_from_file(model)


def make_batches(config: AgriCLIPConfig, batch_size: int, count: int) -> list[dict]:
    """`count` batches of photo-like images and captions of 8 to 40 words, collated by stage 1's collator (images
    already decoded: bench_loading.py measures decoding)."""
    rng = np.random.default_rng(0)
    collate = ImageTextCollator(AgriCLIPProcessor.from_config(config))
    side = config.vision_config.image_size * 8 // 7  # larger than the model's input, so the processor resizes
    ramp = np.linspace(0, 1, side)[None, :, None]
    batches = []
    for _ in range(count):
        decoded = []
        for _ in range(batch_size):
            base = rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 255, 3) * (1 - ramp.transpose(1, 0, 2))
            pixels = np.clip(base / 2 + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            caption = " ".join(rng.choice(WORDS, int(rng.integers(8, 41))))
            decoded.append(({"caption": caption}, Image.fromarray(pixels)))
        batch = collate.collate(decoded)
        batches.append({key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")})
    return batches


def alternating_seconds(steps: dict, batches: list, rounds: int) -> dict[str, list[list[float]]]:
    """Seconds of each contender's steps, by round. The contenders alternate step by step on the same batch, so
    that load from other processes (and the CPU's clock) hits all alike, and the one that goes first changes from
    batch to batch: the step that follows another contender's runs on caches and allocator state that it left,
    which measured 2-7% apart for two identical contenders always run in the same order."""
    seconds = {name: [[] for _ in range(rounds)] for name in steps}
    names = list(steps)
    for round_ in range(rounds):
        for index, batch in enumerate(batches):
            first = (round_ * len(batches) + index) % len(names)
            for name in names[first:] + names[:first]:
                started = time.perf_counter()
                steps[name](batch)
                seconds[name][round_].append(time.perf_counter() - started)
    return seconds


def print_comparison(seconds: dict[str, list[list[float]]], batch_size: int, unit: str, target: str = "") -> None:
    """Each contender's rate (min / median / max over its steps), then the first contender (ours) against each
    other one: the ratio of the median rates, the paired ratios of the steps that ran one after the other on the
    same batch (min / median / max), and each round's ratio of total time. Above 1: ours is faster."""
    width = max(map(len, seconds))
    for name, rounds in seconds.items():
        rates = sorted(batch_size / value for value in sum(rounds, []))
        print(
            f"  {name:{width}s} {unit}: min {rates[0]:8.2f}  median {statistics.median(rates):8.2f}  "
            f"max {rates[-1]:8.2f}  ({len(rates)} steps)"
        )
    (ours, ours_rounds), *references = seconds.items()
    ours_steps = sum(ours_rounds, [])
    for reference, rounds in references:
        reference_steps = sum(rounds, [])
        paired = sorted(theirs / mine for mine, theirs in zip(ours_steps, reference_steps))
        per_round = " ".join(f"{sum(theirs) / sum(mine):.3f}" for mine, theirs in zip(ours_rounds, rounds))
        print(
            f"  {ours} / {reference}: {statistics.median(reference_steps) / statistics.median(ours_steps):.3f}x "
            f"(paired steps: min {paired[0]:.3f}, median {statistics.median(paired):.3f}, max {paired[-1]:.3f}; "
            f"per round: {per_round}){target}"
        )


def bare_clip_model(config: AgriCLIPConfig) -> CLIPModel:
    """A transformers CLIPModel with the towers of `config`, in training mode."""
    return CLIPModel(
        CLIPConfig(
            text_config=config.text_config.to_dict(),
            vision_config=config.vision_config.to_dict(),
            projection_dim=config.projection_dim,
        )
    ).train()


def bare_loop_step(model: CLIPModel, optimizer: torch.optim.Optimizer):
    """The training step of a bare loop: CLIP's own loss, backward, clipping, the optimizer step."""

    def step(batch):
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()

    return step


def stage1_step(config: AgriCLIPConfig, accelerator: Accelerator, keep_autocast: bool = True):
    """Stage 1's update of a fresh AgriCLIP model of `config`, prepared by `accelerator` as the stage-1 script
    prepares it; with `keep_autocast=False`, the model's forward without the mixed-precision autocast Accelerate
    wraps it in (what the same step is under `--mixed-precision no`)."""
    model = AgriCLIPModel(config).train()
    trainable_clip(model, freeze_text=False, freeze_image=False)
    optimizer = adamw(
        param_groups_without_decay(model, WEIGHT_DECAY), accelerator.device, lr=LEARNING_RATE, betas=BETAS, eps=EPS
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if not keep_autocast:
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return update_step(accelerator, model, optimizer)


def update_step(accelerator: Accelerator, model, optimizer):
    """The stage-1 script's update of a prepared model and optimizer, as a function of the batch."""
    loss_fn = ContrastiveLoss()
    checkpoints, position = CheckpointManager(accelerator, "unused-bench-dir"), TrainingPosition()

    def step(batch):
        train_step(
            accelerator,
            model,
            optimizer,
            lambda: contrastive_forward(model, batch, loss_fn),
            LEARNING_RATE,
            MAX_GRAD_NORM,
            position,
            checkpoints,
        )

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="small",
        help=f"Tower sizes of every side: small, a preset ({', '.join(sorted(PRESETS))}) or a JSON "
        "file of AgriCLIPConfig values over a preset.",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Image-text pairs per step.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Passes over the timed steps.")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Untimed steps of each side first.")
    args = parser.parse_args()

    config = bench_config(args.model)
    torch.manual_seed(0)
    accelerator = Accelerator()
    steps = {"agriclip stage 1": stage1_step(config, accelerator)}
    default_model, fused_model = bare_clip_model(config), bare_clip_model(config)
    default_adamw = torch.optim.AdamW(
        param_groups_without_decay(default_model, WEIGHT_DECAY), lr=LEARNING_RATE, betas=BETAS, eps=EPS
    )
    fused_adamw = adamw(
        param_groups_without_decay(fused_model, WEIGHT_DECAY),
        accelerator.device,
        lr=LEARNING_RATE,
        betas=BETAS,
        eps=EPS,
    )
    steps["bare loop, default AdamW"] = bare_loop_step(default_model, default_adamw)
    steps["bare loop, fused AdamW"] = bare_loop_step(fused_model, fused_adamw)

    batches = make_batches(config, args.batch_size, args.steps)
    for step in steps.values():
        for batch in batches[: args.warmup_steps]:
            step(batch)
    seconds = alternating_seconds(steps, batches, args.rounds)
    lengths = [batch["input_ids"].shape[1] for batch in batches]
    vision, text = config.vision_config, config.text_config
    print(
        f"model {args.model}: CLIP towers text {text.hidden_size} wide x {text.num_hidden_layers}, image "
        f"{vision.hidden_size} x {vision.num_hidden_layers} on {vision.image_size} px / {vision.patch_size} px "
        f"patches; "
        f"batch {args.batch_size}, text padded to {min(lengths)}-{max(lengths)} tokens as the collator pads; "
        f"{args.steps} steps x {args.rounds} rounds after {args.warmup_steps} warm-up steps; "
        f"{torch.get_num_threads()} threads, {accelerator.device}"
    )
    print_comparison(seconds, args.batch_size, "samples/s", " (target >= 1.0)")


if __name__ == "__main__":
    main()
