"""Stage-1 training throughput against a minimal reference loop, measured in the same run.

Ours: the stage-1 script's update (`training.contrastive.contrastive_forward` and
`training.runtime.train_step` under an Accelerator: AgriCLIP forward through the CLIP towers, global-batch
InfoNCE, finite-loss check, clipping, AdamW with parameter groups on torch's fused kernel as the stage-1 script
builds it, `training.runtime.adamw`). Reference: plain PyTorch, `transformers.CLIPModel(return_loss=True)` with
the same tower sizes, batch and optimizer settings (torch's default AdamW kernel). Both train on the same
pre-made batches (data loading is benchmarked in bench_loading.py); their steps alternate and each side's median
step counts, so that load from other processes hits both alike. Prints samples per second and the ratio (target
>= 1.0).

    python bench/bench_stage1.py [--preset tiny|vit_b16] [--batch-size 32] [--steps 20] [--rounds 3]
"""

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from transformers import CLIPConfig, CLIPModel

from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.convert import PRESETS
from training.dino import param_groups_without_decay
from training.losses import ContrastiveLoss
from training.runtime import CheckpointManager, TrainingPosition, adamw, train_step
from training.contrastive import contrastive_forward, trainable_clip


def make_batches(config, batch_size: int, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    return [
        {
            "input_ids": torch.randint(0, config.text_config.vocab_size - 2, (batch_size, 20), generator=generator),
            "attention_mask": torch.ones(batch_size, 20, dtype=torch.long),
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        }
        for _ in range(count)
    ]


def alternating_rates(steps: dict, batches: list, rounds: int, batch_size: int) -> dict[str, float]:
    """Samples per second of each contender from its median step. The contenders alternate step by step, so that
    load from other processes (and the CPU's clock) hits both alike, and a step slowed by another process does
    not count against either side."""
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for batch in batches:
            for name, step in steps.items():
                started = time.perf_counter()
                step(batch)
                seconds[name].append(time.perf_counter() - started)
    return {name: batch_size / statistics.median(values) for name, values in seconds.items()}


def print_rates(rates: dict[str, float], timed_steps: int, unit: str, note: str = "") -> None:
    """One line per contender, then the ratio of the first (ours) to the second (the reference)."""
    width = max(map(len, rates))
    for name, rate in rates.items():
        print(f"  {name:{width}s} {rate:8.1f} {unit} (median of {timed_steps} steps)")
    (ours, ours_rate), (reference, reference_rate) = rates.items()
    print(f"  ratio {ours} / {reference}: {ours_rate / reference_rate:.3f}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Tower sizes of both models.")
    parser.add_argument("--batch-size", type=int, default=32, help="Image-text pairs per step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Passes over the timed steps.")
    args = parser.parse_args()

    config = PRESETS[args.preset]()
    torch.manual_seed(0)
    ours = AgriCLIPModel(config).train()
    trainable_clip(ours, freeze_text=False, freeze_image=False)
    reference = CLIPModel(CLIPConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                                     projection_dim=config.projection_dim)).train()
    accelerator = Accelerator()
    ours_optimizer = adamw(param_groups_without_decay(ours, 0.2), accelerator.device, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    ours, ours_optimizer = accelerator.prepare(ours, ours_optimizer)
    reference_optimizer = torch.optim.AdamW(param_groups_without_decay(reference, 0.2), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ContrastiveLoss()
    logit_scale = accelerator.unwrap_model(ours).logit_scale
    checkpoints = CheckpointManager(accelerator, "unused-bench-dir")
    position = TrainingPosition()

    def ours_step(batch):
        train_step(accelerator, ours, ours_optimizer, lambda: contrastive_forward(ours, batch, loss_fn, logit_scale),
                   1e-5, 1.0, position, checkpoints)

    def reference_step(batch):
        loss = reference(**batch, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    batches = make_batches(config, args.batch_size, args.steps)
    for step in (ours_step, reference_step):  # warm-up
        for batch in batches[:3]:
            step(batch)
    rates = alternating_rates({"agriclip stage 1": ours_step, "reference CLIPModel loop": reference_step}, batches,
                              args.rounds, args.batch_size)
    print(f"preset {args.preset}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, {accelerator.device}")
    print_rates(rates, args.steps * args.rounds, "samples/s", " (target >= 1.0)")


if __name__ == "__main__":
    main()
