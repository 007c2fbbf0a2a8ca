"""bf16 mixed precision against float32 on this machine's CPU: the training step ratio of stage 1 and of stage 2's
update, measured in the same run.

What `--mixed-precision bf16` (or `accelerate launch --mixed-precision bf16`) runs on the CPU: Accelerate wraps the
prepared model's forward in CPU autocast to bfloat16 (matrix products, convolutions and attention in bfloat16, what
follows them in their dtype, a few precision-sensitive operations in float32) and hands its outputs back in float32,
on which the stages compute their losses; weights, gradients, optimizer states and checkpoints stay float32, and no
gradient scaler runs (bfloat16 has float32's range). Both sides train a fresh model of the same config under one
`Accelerator(mixed_precision="bf16")`; the float32 side is the same step with that autocast wrapper taken off
(`accelerator.unwrap_model(model, keep_fp32_wrapper=False)`), which is the step under `--mixed-precision no`: one
process can hold only one Accelerate precision, and the two sides must alternate in one process to be compared
fairly on a shared machine.

Whether bf16 pays depends on the CPU: oneDNN runs bfloat16 matrix products natively on AVX512-BF16 (AMD Zen 4 and
later, Intel Cooper Lake) and on AMX-BF16 tiles (Intel Sapphire Rapids and later), and emulates them elsewhere, often
more slowly than float32. The bench prints the CPU's model name and the flags it saw in /proc/cpuinfo.

- stage 1: `bench_stage1.stage1_step` (the stage-1 script's update) on bench_stage1's batches of `--model`
  (`small` by default);
- stage 2: the DINO update of `training.distillation` (the teacher on the 2 global views, the student on all views,
  the DINO loss, `training.runtime.train_step` with clipping and AdamW, the EMA teacher update) with stage 2's
  published recipe (65,536 prototypes; 2 global views at the model's image size, 8 local ones of 3/7 of it) on
  `--model`'s DINO backbone, on pre-made views (the multi-crop augmentation runs outside autocast, the same on both
  sides; bench_stage2.py measures it). As in stage 2, only the student is prepared by Accelerate: the teacher's
  forward stays float32 under bf16.

Prints each side's samples per second (min / median / max over the timed steps), then bf16 / float32: the ratio of
the medians, the paired ratios of the steps that ran one after the other on the same batch (min / median / max) and
each round's ratio of total time. Above 1: bf16 is faster. Run from the repository root:

    python -m bench.bench_precision [--model small|tiny|vit_b16|FILE.json] [--stages 1 2] [--batch-size 32]
        [--stage2-batch-size 8] [--steps 6] [--rounds 2]
"""

import argparse
import copy
from pathlib import Path

import torch
from accelerate import Accelerator

from bench.bench_stage1 import alternating_seconds, bench_config, make_batches, print_comparison, stage1_step
from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.convert import PRESETS
from modeling_agriclip.modeling_agriclip import backbone_features
from training.dino import DINOHead, MultiCropWrapper, param_groups_without_decay, update_teacher
from training.losses import DINOLoss
from training.runtime import CheckpointManager, TrainingPosition, adamw, train_step
from training.stage2_dino import PUBLISHED


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Stage 2's defaults with AdamW (training.stage2_dino): 5e-4 per 256 images, weight decay 0.04 at the start,
# gradients clipped at 3.
STAGE2_LEARNING_RATE, STAGE2_WEIGHT_DECAY, STAGE2_MAX_GRAD_NORM = 5e-4, 0.04, 3.0


def cpu_description() -> str:
    """The CPU's model name, which of `CPU_FLAGS` /proc/cpuinfo lists, and what torch and oneDNN make of them."""
    name, flags = "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    seen = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return (
        f"{name}; /proc/cpuinfo flags: {seen}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN bf16 {'supported' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'not supported'}; "
        f"{torch.get_num_threads()} threads"
    )


def stage2_step(config, accelerator: Accelerator, keep_autocast: bool = True):
    """Stage 2's update of a fresh student (the DINO backbone of `config` plus the published head) and its teacher,
    prepared by `accelerator` as stage 2 prepares them; `keep_autocast` as in `bench_stage1.stage1_step`."""
    backbone = AgriCLIPModel(config).dino_model
    size = config.vision_config.image_size
    feature_size = backbone_features(backbone.eval(), torch.zeros(1, 3, size, size)).shape[-1]
    student = MultiCropWrapper(
        backbone.train(),
        DINOHead(
            feature_size,
            PUBLISHED["out_dim"],
            hidden_dim=PUBLISHED["head_hidden_dim"],
            bottleneck_dim=PUBLISHED["head_bottleneck_dim"],
        ),
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = adamw(param_groups_without_decay(student, STAGE2_WEIGHT_DECAY), accelerator.device, lr=0)
    student, optimizer = accelerator.prepare(student, optimizer)
    if not keep_autocast:
        student = accelerator.unwrap_model(student, keep_fp32_wrapper=False)
    teacher.to(accelerator.device)
    dino_loss = DINOLoss(PUBLISHED["out_dim"], 2 + PUBLISHED["num_local_crops"], num_steps=1).to(accelerator.device)
    checkpoints, position = CheckpointManager(accelerator, "unused-bench-dir"), TrainingPosition()

    def step(crops):
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        train_step(
            accelerator,
            student,
            optimizer,
            lambda: dino_loss(student(crops), teacher_output, 0),
            STAGE2_LEARNING_RATE,
            STAGE2_MAX_GRAD_NORM,
            position,
            checkpoints,
        )
        update_teacher(accelerator.unwrap_model(student), teacher, PUBLISHED["momentum_teacher"])

    return step


def make_views(size: int, batch_size: int, count: int) -> list[list[torch.Tensor]]:
    """`count` sets of normalised views: 2 global ones of `size` px and the published number of local ones, of the
    size stage 2 gives them by default."""
    generator = torch.Generator().manual_seed(0)
    sides = [size] * 2 + [max(8, size * 3 // 7)] * PUBLISHED["num_local_crops"]
    return [[torch.randn(batch_size, 3, side, side, generator=generator) for side in sides] for _ in range(count)]


def compare(name: str, steps: dict, batches: list, batch_size: int, args) -> None:
    """Warms the sides up, times them alternately and prints the comparison (bf16 first)."""
    for step in steps.values():
        for batch in batches[: args.warmup_steps]:
            step(batch)
    seconds = alternating_seconds(steps, batches, args.rounds)
    print(
        f"{name}: batch {batch_size}, {args.steps} steps x {args.rounds} rounds after {args.warmup_steps} warm-up steps"
    )
    print_comparison(seconds, batch_size, "samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="small",
        help=f"Tower sizes: small (bench_stage1's default), a preset ({', '.join(sorted(PRESETS))}) "
        "or a JSON file of AgriCLIPConfig values over a preset.",
    )
    parser.add_argument("--stages", type=int, nargs="+", choices=(1, 2), default=(1, 2), help="Stages to measure.")
    parser.add_argument("--batch-size", type=int, default=32, help="Image-text pairs per stage-1 step.")
    parser.add_argument("--stage2-batch-size", type=int, default=8, help="Images per stage-2 step (10 views each).")
    parser.add_argument("--steps", type=int, default=6, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=2, help="Passes over the timed steps.")
    parser.add_argument("--warmup-steps", type=int, default=2, help="Untimed steps of each side first.")
    args = parser.parse_args()

    config = bench_config(args.model)
    accelerator = Accelerator(mixed_precision="bf16")
    print(f"model {args.model}; {cpu_description()}; {accelerator.device}")
    if 1 in args.stages:
        torch.manual_seed(0)
        steps = {
            "stage 1, bf16": stage1_step(config, accelerator),
            "stage 1, float32": stage1_step(config, accelerator, keep_autocast=False),
        }
        compare("stage 1", steps, make_batches(config, args.batch_size, args.steps), args.batch_size, args)
    if 2 in args.stages:
        torch.manual_seed(0)
        steps = {
            "stage 2, bf16": stage2_step(config, accelerator),
            "stage 2, float32": stage2_step(config, accelerator, keep_autocast=False),
        }
        views = make_views(config.vision_config.image_size, args.stage2_batch_size, args.steps)
        compare("stage 2", steps, views, args.stage2_batch_size, args)


if __name__ == "__main__":
    main()
