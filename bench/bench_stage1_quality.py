"""Zero-shot quality of stage 1 against a bare CLIP training loop of the same towers, steps and recipe.

The reference is what a researcher writes in an afternoon: `transformers.CLIPModel` with AgriCLIP's tiny towers,
AdamW (CLIP's betas and epsilon, no decay on biases, norms, embeddings and the temperature), a linear warm-up then
cosine learning rate, one random caption variant per image and step, the temperature clamped at 100, and (as an
arm) a random resized crop and horizontal flip written in plain torch. Stage 1 runs as a user runs it
(`python -m training.stage1_contrastive`, the same options). Both train on the embedded dataset's pretraining pairs
for the same number of optimizer steps and are evaluated zero-shot on its downstream suite (mean top-1 over the
tasks, prompt ensembles as the suite gives them), once per seed, with and without augmentation:

    python -m bench.bench_stage1_quality --seeds 0 1 2

Prints top-1 per arm and seed, the mean and standard deviation over the seeds, and stage 1 minus the bare loop in
points; README.md ("What the demo shows") gives the result measured over seeds 0, 1 and 2.
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from agriclip.images import open_image
from agriclip.sources import load_image_text_dataset
from evaluation.runner import run_suite
from modeling_agriclip import AgriCLIPConfig
from modeling_agriclip.tokenizer import build_clip_tokenizer
from modeling_agriclip.zero_shot import ZeroShotClassifier
from training import stage1_contrastive
from training.embedded import build_embedded_dataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="An embedded dataset folder (default: built into a temporary one)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10, help="Passes over the pretraining pairs (the demo's 10).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0))
    parser.add_argument("--augment", choices=["both", "yes", "no"], default="both", help="Which augmentation arms run.")
    return parser.parse_args(argv)


def bare_crop_and_flip(pixels: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per image: a crop of `scale` of the area with aspect ratio in [3/4, 4/3], resized back bicubically, then a
    horizontal flip with probability 1/2."""
    size = pixels.shape[-1]
    out = torch.empty_like(pixels)
    for index, image in enumerate(pixels):
        area = size * size * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=generator).item())
        width = min(size, max(1, round(math.sqrt(area * ratio))))
        height = min(size, max(1, round(math.sqrt(area / ratio))))
        top = torch.randint(size - height + 1, (), generator=generator).item()
        left = torch.randint(size - width + 1, (), generator=generator).item()
        crop = image[None, :, top : top + height, left : left + width]
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False)[0]
        out[index] = crop.flip(-1) if torch.rand((), generator=generator).item() < 0.5 else crop
    return out


def train_bare_loop(args, data: Path, seed: int, augment: bool) -> tuple[ZeroShotClassifier, float]:
    """The reference loop; returns its zero-shot classifier and the seconds it trained."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tiny = AgriCLIPConfig.tiny()
    config = CLIPConfig(
        text_config=tiny.text_config.to_dict(),
        vision_config=tiny.vision_config.to_dict(),
        projection_dim=tiny.projection_dim,
    )
    model = CLIPModel(config).train()
    # CLIP's own processor around the tokenizer AgriCLIP builds (the CLIP BPE, offline): resize, centre crop, CLIP's
    # normalisation.
    size = tiny.vision_config.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=build_clip_tokenizer(),
    )
    pairs = load_image_text_dataset(data / "pretrain", split="train")
    images = [open_image(row["path"]) for row in pairs["image"]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    captions = pairs["captions"]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = len(images) // args.batch_size
    total = steps_per_epoch * args.epochs

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.learning_rate * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return 0.5 * args.learning_rate * (1 + math.cos(math.pi * progress))

    started = time.perf_counter()
    step = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        for first in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            rows = order[first : first + args.batch_size]
            choice = [captions[r][torch.randint(len(captions[r]), (), generator=generator).item()] for r in rows]
            text = processor.tokenizer(choice, return_tensors="pt", padding=True, truncation=True)
            batch_pixels = pixels[rows]
            if augment:
                batch_pixels = bare_crop_and_flip(batch_pixels, tuple(args.crop_scale), generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = model(
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
                pixel_values=batch_pixels,
                return_loss=True,
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
    seconds = time.perf_counter() - started
    model.eval()
    return ZeroShotClassifier(model, processor), seconds


def train_stage1(args, data: Path, seed: int, augment: bool, output: Path) -> tuple[str, float]:
    """Stage 1 as a user runs it; returns the model spec to evaluate and the seconds it took."""
    flags = [
        "--model",
        "tiny",
        "--train-data",
        str(data / "pretrain"),
        "--output-dir",
        str(output),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--learning-rate",
        str(args.learning_rate),
        "--warmup-steps",
        str(args.warmup_steps),
        "--weight-decay",
        str(args.weight_decay),
        "--seed",
        str(seed),
        "--log-with",
        "none",
        "--checkpoint-every",
        "100000",
    ]
    if augment:
        flags += ["--augment", "--crop-scale", *map(str, args.crop_scale)]
    started = time.perf_counter()
    final = stage1_contrastive.main(flags)
    return f"{final}:clip", time.perf_counter() - started


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = Path(args.data) if args.data else build_embedded_dataset(scratch / "data", seed=0)
        augments = {"both": (False, True), "yes": (True,), "no": (False,)}[args.augment]
        scores: dict[tuple[str, bool], list[float]] = {}
        for seed in args.seeds:
            for augment in augments:
                bare, bare_seconds = train_bare_loop(args, data, seed, augment)
                spec, stage1_seconds = train_stage1(args, data, seed, augment, scratch / f"stage1-{seed}-{augment}")
                results = run_suite(
                    data / "suite.yaml",
                    {"bare": bare, "stage1": spec},
                    scratch / f"eval-{seed}-{augment}",
                    batch_size=64,
                )
                means = {name.split(" ")[0]: value["top1"] * 100 for name, value in results["mean"].items()}
                for name, value in means.items():
                    scores.setdefault((name, augment), []).append(value)
                print(
                    f"seed {seed}, augmentation {'on' if augment else 'off'}: bare loop {means['bare']:.1f} "
                    f"({bare_seconds:.0f} s), stage 1 {means['stage1']:.1f} ({stage1_seconds:.0f} s) mean top-1 %"
                )
        chance = results["chance"]["mean"]["top1"] * 100  # the same suite in every run
        print(f"\nmean zero-shot top-1 % over {len(args.seeds)} seed(s) {args.seeds} (chance {chance:.1f}):")
        for augment in augments:
            bare, ours = scores[("bare", augment)], scores[("stage1", augment)]
            deltas = [o - b for o, b in zip(ours, bare)]
            print(
                f"  augmentation {'on ' if augment else 'off'}: bare loop {_mean_sd(bare)}, stage 1 {_mean_sd(ours)}, "
                f"stage 1 - bare {_mean_sd(deltas)} points"
            )


def _mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {spread:.1f}"


if __name__ == "__main__":
    main()
