"""Stage-2 training throughput: the DINO step fed by the batched kornia multi-crop against the same step fed by
DINO's per-image PIL multi-crop, measured in the same run.

Both sides run the stage-2 update on the same images: multi-crop views, the teacher on the 2 global views, the
student on all views, the DINO loss, `training.runtime.train_step` (finite-loss check, clipping, AdamW) and the
EMA teacher update. Ours makes the views with `MultiCropAugmentation` on the training device from the batch tensor;
the reference makes them one image at a time with `bench_multicrop.PILMultiCrop`, as DINO's DataLoader workers do,
here in this process. The steps alternate and each side's median step counts, so that load from other processes
hits both alike. Prints training samples per second of each and the ratio. Run from the repository root:

    python -m bench.bench_stage2 [--preset tiny|vit_b16] [--batch-size 32] [--num-local-crops 6] [--steps 10]
"""

import argparse
import copy
import math

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from bench.bench_multicrop import PILMultiCrop
from bench.bench_stage1 import alternating_rates, print_rates
from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.convert import PRESETS
from modeling_agriclip.modeling_agriclip import backbone_features
from training.dino import DINOHead, MultiCropAugmentation, MultiCropWrapper, param_groups_without_decay, update_teacher
from training.losses import DINOLoss
from training.runtime import CheckpointManager, TrainingPosition, train_step


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
    recipe = "resnet" if backbone.config.model_type == "resnet" else "vit"
    feature_size = backbone_features(backbone.eval(), torch.zeros(1, 3, global_size, global_size)).shape[-1]
    student = MultiCropWrapper(backbone.train(), DINOHead(feature_size, args.out_dim))
    teacher = copy.deepcopy(student).requires_grad_(False)
    accelerator = Accelerator(cpu=args.device == "cpu")
    optimizer = torch.optim.AdamW(param_groups_without_decay(student, 0.04), lr=0)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)
    dino_loss = DINOLoss(args.out_dim, 2 + args.num_local_crops, num_steps=1).to(accelerator.device)
    checkpoints, position = CheckpointManager(accelerator, "unused-bench-dir"), TrainingPosition()

    augment = MultiCropAugmentation(recipe, args.num_local_crops, global_size, local_size,
                                    mean=config.dino_image_mean, std=config.dino_image_std).to(accelerator.device)
    pil_augment = PILMultiCrop(recipe, args.num_local_crops, global_size, local_size)
    side = math.ceil(global_size * 8 / 7)  # what stage 2's collator hands the augmentation
    pixels = np.random.default_rng(0).integers(0, 256, (args.steps, args.batch_size, side, side, 3), dtype=np.uint8)
    batches = [
        {"tensor": torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), "pil": [Image.fromarray(a) for a in batch]}
        for batch in pixels
    ]

    def dino_step(crops):
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        train_step(accelerator, student, optimizer, lambda: dino_loss(student(crops), teacher_output, 0), 5e-4, 3.0,
                   position, checkpoints)
        update_teacher(accelerator.unwrap_model(student), teacher, 0.996)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    def ours(batch):
        dino_step(augment(batch["tensor"].to(accelerator.device, non_blocking=True).float().div_(255)))

    def reference(batch):
        dino_step([view.to(accelerator.device, non_blocking=True) for view in pil_augment(batch["pil"])])

    for step in (ours, reference):  # warm-up
        step(batches[0])
    rates = alternating_rates({"kornia multi-crop": ours, "PIL multi-crop": reference}, batches, args.rounds, args.batch_size)
    print(f"preset {args.preset} ({backbone.config.model_type} backbone), batch {args.batch_size}, 2 x {global_size}px + "
          f"{args.num_local_crops} x {local_size}px views, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, {accelerator.device}")
    print_rates(rates, args.steps * args.rounds, "training samples/s")


if __name__ == "__main__":
    main()
