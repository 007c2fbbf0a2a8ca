"""Throughput of the batched kornia MultiCropAugmentation against DINO's per-image PIL pipeline.

Both sides make the same views from the same images: 2 global and N local crops per image, with DINO's
random resized crop (bicubic), flip, colour jitter, grayscale, Gaussian blur and solarisation, then a float
tensor normalised with the ImageNet statistics. The PIL side is the reference measured in the same run,
one image at a time in this process (as one DataLoader worker would run it). Run from the repository
root (or with the package installed):

    python -m bench.bench_multicrop --num-images 64 --image-size 256 --num-local-crops 6
"""

import argparse
import math
import random
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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

    def view(self, image: Image.Image, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> torch.Tensor:
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


def best_seconds(functions: dict, repeats: int, device: torch.device) -> dict:
    """Best of `repeats` timed calls per function (call each once before, to warm up).

    The functions take turns, so that load from other processes on a shared machine hits every side alike.
    """

    def timed(function):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    best = {name: math.inf for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            best[name] = min(best[name], timed(function))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64, help="images per batch")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square input images")
    parser.add_argument("--global-size", type=int, default=224, help="side of the 2 global crops")
    parser.add_argument("--local-size", type=int, default=96, help="side of the local crops")
    parser.add_argument("--num-local-crops", type=int, default=6, help="local crops per image")
    parser.add_argument("--preset", choices=sorted(MULTICROP_PRESETS), default="vit", help="DINO crop-scale recipe")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side, alternating (the best is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the kornia side")
    args = parser.parse_args()

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.num_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    pil_images = [Image.fromarray(array) for array in pixels]
    uint8_batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    pil_pipeline = PILMultiCrop(args.preset, args.num_local_crops, args.global_size, args.local_size)
    kornia_pipeline = MultiCropAugmentation(
        args.preset, num_local_crops=args.num_local_crops, global_size=args.global_size, local_size=args.local_size
    ).to(device)

    # The kornia side includes the host-to-device copy and the uint8-to-float conversion.
    def run_kornia():
        return kornia_pipeline(uint8_batch.to(device, non_blocking=True).float().div_(255))

    pil_views, kornia_views = pil_pipeline(pil_images), run_kornia()  # also the warm-up calls
    if [v.shape for v in pil_views] != [v.shape for v in kornia_views]:
        raise SystemExit(f"bench_multicrop: the pipelines disagree on view shapes: {[tuple(v.shape) for v in pil_views]} vs {[tuple(v.shape) for v in kornia_views]}")

    views = args.num_images * (2 + args.num_local_crops)
    seconds = best_seconds({"pil": lambda: pil_pipeline(pil_images), "kornia": run_kornia}, args.repeats, device)
    pil_seconds, kornia_seconds = seconds["pil"], seconds["kornia"]
    print(
        f"{args.num_images} images of {args.image_size}px -> 2 x {args.global_size}px + {args.num_local_crops} x "
        f"{args.local_size}px views, preset {args.preset}; torch threads {torch.get_num_threads()}, kornia on {device}"
    )
    print(f"PIL per-image loop (reference): {views / pil_seconds:10.1f} views/s  ({pil_seconds * 1e3:8.1f} ms/batch)")
    print(f"kornia batched:                 {views / kornia_seconds:10.1f} views/s  ({kornia_seconds * 1e3:8.1f} ms/batch)")
    print(f"ratio kornia / PIL: {pil_seconds / kornia_seconds:.2f}x")


if __name__ == "__main__":
    main()
