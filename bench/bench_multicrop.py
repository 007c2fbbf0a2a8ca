"""Throughput of the batched MultiCropAugmentation against DINO's per-image PIL pipeline, measured in the same run.

Both sides make the same views from the same images: 2 global and N local crops per image, with DINO's random resized
crop, flip, colour jitter, grayscale, Gaussian blur and solarisation, then a float tensor normalised with the ImageNet
statistics. Ours (`training.dino.MultiCropAugmentation`) takes the batch as a uint8 tensor and includes the copy to the
device and the conversion to float. The reference is `PILMultiCrop`, DINO's DataAugmentationDINO (main_dino.py)
written with PIL only, one image at a time in this process, as one DataLoader worker runs it. The sides alternate call
by call on the same batch, so that load from other processes hits both alike; the bench prints the load average
before and after, and torch's thread count (the PIL side runs on one thread). Prints each side's views per second
(min / median / max over the timed calls), then ours / PIL: the ratio of the medians, the paired ratios of the calls
that ran one after the other (min / median / max) and each round's ratio of total time. Target: >= 1.5x on the CPU.
Run from the repository root (or with the package installed):

    python -m bench.bench_multicrop [--num-images 64] [--image-size 256] [--num-local-crops 6] [--calls 2] [--rounds 3]
"""

import argparse
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from bench.bench_stage1 import alternating_seconds, print_comparison
from training.dino import MULTICROP_PRESETS, MultiCropAugmentation


class PILMultiCrop:
    """DINO's DataAugmentationDINO on PIL images, written with PIL only (torchvision is not a dependency)."""

    def __init__(self, preset: str, num_local_crops: int, global_size: int, local_size: int, seed: int = 0):
        scales = MULTICROP_PRESETS[preset]
        self.global_crops_scale, self.local_crops_scale = scales.global_crops_scale, scales.local_crops_scale
        self.num_local_crops = num_local_crops
        self.global_size, self.local_size = global_size, local_size
        self.rng = random.Random(seed)
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def random_resized_crop(self, image: Image.Image, size: int, scale: tuple[float, float]) -> Image.Image:
        """torchvision RandomResizedCrop.get_params with ratio (3/4, 4/3), then a bicubic resize of the box."""
        width, height = image.size
        for _ in range(10):
            target_area = width * height * self.rng.uniform(*scale)
            aspect = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_w, crop_h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left, top = self.rng.randint(0, width - crop_w), self.rng.randint(0, height - crop_h)
                return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
        return image.resize((size, size), Image.BICUBIC)

    def color_jitter(self, image: Image.Image) -> Image.Image:
        """ColorJitter(0.4, 0.4, 0.2, 0.1) in a random order, as torchvision does on PIL images."""
        operations = [
            lambda im: ImageEnhance.Brightness(im).enhance(self.rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Contrast(im).enhance(self.rng.uniform(0.6, 1.4)),
            lambda im: ImageEnhance.Color(im).enhance(self.rng.uniform(0.8, 1.2)),
            self.adjust_hue,
        ]
        self.rng.shuffle(operations)
        for operation in operations:
            image = operation(image)
        return image

    def adjust_hue(self, image: Image.Image) -> Image.Image:
        hue, saturation, value = image.convert("HSV").split()
        shift = np.uint8(round(self.rng.uniform(-0.1, 0.1) * 255) % 256)
        hue = Image.fromarray(np.asarray(hue, dtype=np.uint8) + shift, "L")
        return Image.merge("HSV", (hue, saturation, value)).convert("RGB")

    def view(
        self, image: Image.Image, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
    ) -> torch.Tensor:
        image = self.random_resized_crop(image, size, scale)
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rng.random() < 0.8:
            image = self.color_jitter(image)
        if self.rng.random() < 0.2:
            image = image.convert("L").convert("RGB")
        if self.rng.random() < blur_p:
            image = image.filter(ImageFilter.GaussianBlur(radius=self.rng.uniform(0.1, 2.0)))
        if self.rng.random() < solarize_p:
            image = ImageOps.solarize(image, threshold=128)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (pixels - self.mean) / self.std

    def __call__(self, images: list[Image.Image]) -> list[torch.Tensor]:
        per_image = []
        for image in images:
            crops = [
                self.view(image, self.global_size, self.global_crops_scale, blur_p=1.0, solarize_p=0.0),
                self.view(image, self.global_size, self.global_crops_scale, blur_p=0.1, solarize_p=0.2),
            ]
            crops += [
                self.view(image, self.local_size, self.local_crops_scale, blur_p=0.5, solarize_p=0.0)
                for _ in range(self.num_local_crops)
            ]
            per_image.append(crops)
        return [torch.stack(view) for view in zip(*per_image)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was besides this bench."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64, help="images per batch")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square input images")
    parser.add_argument("--global-size", type=int, default=224, help="side of the 2 global crops")
    parser.add_argument("--local-size", type=int, default=96, help="side of the local crops")
    parser.add_argument("--num-local-crops", type=int, default=6, help="local crops per image")
    parser.add_argument("--preset", choices=sorted(MULTICROP_PRESETS), default="vit", help="DINO crop-scale recipe")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the timed calls")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of our side")
    args = parser.parse_args()

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    pil_images = [Image.fromarray(array) for array in pixels]
    uint8_batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    pil_pipeline = PILMultiCrop(args.preset, args.num_local_crops, args.global_size, args.local_size)
    our_pipeline = MultiCropAugmentation(
        args.preset, num_local_crops=args.num_local_crops, global_size=args.global_size, local_size=args.local_size
    ).to(device)

    def ours(batch):
        views = our_pipeline(batch["tensor"].to(device, non_blocking=True).float().div_(255))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return views

    def reference(batch):
        return pil_pipeline(batch["pil"])

    batch = {"tensor": uint8_batch, "pil": pil_images}
    pil_views, our_views = reference(batch), ours(batch)  # also the warm-up calls
    if [v.shape for v in pil_views] != [v.shape for v in our_views]:
        raise SystemExit(
            f"bench_multicrop: the pipelines disagree on view shapes: {[tuple(v.shape) for v in pil_views]} "
            f"vs {[tuple(v.shape) for v in our_views]}"
        )

    views = args.num_images * (2 + args.num_local_crops)
    print(
        f"{args.num_images} images of {args.image_size}px -> 2 x {args.global_size}px + {args.num_local_crops} x "
        f"{args.local_size}px views ({views} per call), preset {args.preset}; ours on {device} with "
        f"{torch.get_num_threads()} torch threads; {args.calls} calls x {args.rounds} rounds"
    )
    print("reference: DINO's DataAugmentationDINO per image on PIL (bench_multicrop.PILMultiCrop), one thread")
    print(f"load average (1 / 5 / 15 min) before: {load_average()}")
    seconds = alternating_seconds(
        {"ours, batched": ours, "PIL per image": reference}, [batch] * args.calls, args.rounds
    )
    print(f"load average (1 / 5 / 15 min) after:  {load_average()}")
    print_comparison(seconds, views, "views/s", " (target >= 1.5x)")


if __name__ == "__main__":
    main()
