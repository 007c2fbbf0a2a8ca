"""Stage-2 training throughput: the whole step (multi-crop augmentation, then the DINO update) with our batched
multi-crop against the same step fed by DINO's per-image PIL multi-crop, measured in the same run.

Every contender runs the stage-2 update of `training.distillation` on the same images: the teacher on the 2 global
views, the student on all views, the DINO loss, `training.runtime.train_step` (finite-loss check, clipping, AdamW on
`training.runtime.adamw`'s kernel) and the EMA teacher update. Contenders:

- "batched multi-crop + step" (ours): `MultiCropAugmentation` makes the views on the training device from the batch
  tensor (uint8, converted to float there), as stage 2 does;
- "PIL multi-crop + step": `bench_multicrop.PILMultiCrop` makes them one image at a time, as DINO's DataLoader
  workers do, here in this process;
- "step on ready views": the update alone on views made before timing, the reference for the DINO step itself: the
  ceiling of any augmentation, and ours / it is the share of the step the batched multi-crop leaves.

The contenders alternate step by step on the same batches, so that load from other processes hits all alike; the
bench prints the load average before and after, and torch's thread count. Prints each one's training samples per
second (min / median / max over the timed steps), then ours against each reference: the ratio of the medians, the
paired ratios of the steps that ran one after the other (min / median / max) and each round's ratio of total time.
Target: ours >= 1.2x the PIL path on the CPU. Run from the repository root:

    python -m bench.bench_stage2 [--preset tiny|vit_b16] [--batch-size 32] [--num-local-crops 6] [--steps 10]
"""

import argparse
import copy
import math

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from bench.bench_multicrop import PILMultiCrop, load_average
from bench.bench_stage1 import alternating_seconds, print_comparison
from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.backbones import backbone_family
from modeling_agriclip.convert import PRESETS
from modeling_agriclip.modeling_agriclip import backbone_features
from training.dino import DINOHead, MultiCropAugmentation, MultiCropWrapper, param_groups_without_decay, update_teacher
from training.losses import DINOLoss
from training.runtime import CheckpointManager, TrainingPosition, adamw, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Backbone of this AgriCLIP preset.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per step.")
    parser.add_argument("--num-local-crops", type=int, default=6, help="Local views per image.")
    parser.add_argument("--out-dim", type=int, default=4096, help="Prototypes of the DINO head (65,536 published).")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Passes over the timed steps.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Training device.")
    args = parser.parse_args()

    config = PRESETS[args.preset]()
    torch.manual_seed(0)
    backbone = AgriCLIPModel(config).dino_model.train()
    global_size = config.vision_config.image_size
    local_size = max(8, global_size * 3 // 7)
    recipe = backbone_family(backbone.config).crop_recipe
    feature_size = backbone_features(backbone.eval(), torch.zeros(1, 3, global_size, global_size)).shape[-1]
    student = MultiCropWrapper(backbone.train(), DINOHead(feature_size, args.out_dim))
    teacher = copy.deepcopy(student).requires_grad_(False)
    accelerator = Accelerator(cpu=args.device == "cpu")
    optimizer = adamw(param_groups_without_decay(student, 0.04), accelerator.device, lr=0)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)
    dino_loss = DINOLoss(args.out_dim, 2 + args.num_local_crops, num_steps=1).to(accelerator.device)
    checkpoints, position = CheckpointManager(accelerator, "unused-bench-dir"), TrainingPosition()

    augment = MultiCropAugmentation(
        recipe, args.num_local_crops, global_size, local_size, mean=config.dino_image_mean, std=config.dino_image_std
    ).to(accelerator.device)
    pil_augment = PILMultiCrop(recipe, args.num_local_crops, global_size, local_size)
    side = math.ceil(global_size * 8 / 7)  # what stage 2's collator hands the augmentation
    pixels = np.random.default_rng(0).integers(0, 256, (args.steps, args.batch_size, side, side, 3), dtype=np.uint8)
    batches = [
        {"tensor": torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), "pil": [Image.fromarray(a) for a in batch]}
        for batch in pixels
    ]

    def batched_views(batch):
        return augment(batch["tensor"].to(accelerator.device, non_blocking=True).float().div_(255))

    for batch in batches:
        batch["views"] = batched_views(batch)

    def dino_step(crops):
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        train_step(
            accelerator,
            student,
            optimizer,
            lambda: dino_loss(student(crops), teacher_output, 0),
            5e-4,
            3.0,
            position,
            checkpoints,
        )
        update_teacher(accelerator.unwrap_model(student), teacher, 0.996)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    steps = {
        "batched multi-crop + step": lambda batch: dino_step(batched_views(batch)),
        "PIL multi-crop + step": lambda batch: dino_step(
            [view.to(accelerator.device, non_blocking=True) for view in pil_augment(batch["pil"])]
        ),
        "step on ready views": lambda batch: dino_step(batch["views"]),
    }
    for step in steps.values():  # warm-up
        step(batches[0])
    print(
        f"preset {args.preset} ({backbone.config.model_type} backbone), batch {args.batch_size} of {side}px images -> "
        f"2 x {global_size}px + {args.num_local_crops} x {local_size}px views, {args.out_dim} prototypes; "
        f"{args.steps} steps x {args.rounds} rounds; {torch.get_num_threads()} torch threads, {accelerator.device}"
    )
    print(
        "references: DINO's per-image PIL multi-crop (bench_multicrop.PILMultiCrop, one thread) feeding the same "
        "step; the step alone on ready views"
    )
    print(f"load average (1 / 5 / 15 min) before: {load_average()}")
    seconds = alternating_seconds(steps, batches, args.rounds)
    print(f"load average (1 / 5 / 15 min) after:  {load_average()}")
    print_comparison(seconds, args.batch_size, "training samples/s")
    print("  target: batched multi-crop + step >= 1.2x PIL multi-crop + step")


if __name__ == "__main__":
    main()
