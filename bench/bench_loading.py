"""Loading throughput: decoded and preprocessed images per second through the training data path, against a plain
PIL loop over the same files, printed as a ratio.

Two comparisons over the same image files (the ALive-mini pretraining split of the embedded dataset unless --data
names another image-text source):

- stage 1: `load_image_text_dataset` + `DataLoader` + `ImageTextCollator` with the real tiny AgriCLIP processor
  (decode, preprocess, tokenise) vs a loop of `Image.open(path).convert("RGB")` feeding the same image processor;
- stage 2: the same dataset + `ImageCollator` (decode, resize, crop, to tensor) vs a loop of PIL open/convert plus
  the same resize-crop and tensor conversion.

A ratio of 1.0 means the robust data path (datasets rows, error handling, EXIF and mode checks, DataLoader) costs
nothing over the bare loop. Each side runs `--repeats` times after a warm-up read of every file; the best run counts.

    python bench/bench_loading.py [--data DIR] [--limit 1024] [--batch-size 64] [--num-workers 0]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path


# Run as a plain script from anywhere: the repository root holds the `training` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from agriclip.sources import load_image_text_dataset  # noqa: E402
from training.data import ImageCollator, ImageTextCollator, resize_center_crop  # noqa: E402
from training.embedded import build_embedded_dataset, pretraining_sources  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Image-text source (default: build the embedded dataset).")
    parser.add_argument("--split", default="train", help="Split of --data to read.")
    parser.add_argument("--limit", type=int, default=1024, help="Number of images per pass.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per batch on both sides.")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the data path.")
    parser.add_argument("--size", type=int, default=64, help="Crop size of the stage-2 comparison.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes per side; the best counts.")
    return parser.parse_args(argv)


def best_rate(run, count: int, repeats: int) -> float:
    """Images per second of the fastest of `repeats` passes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return count / min(times)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main(argv=None) -> None:
    args = parse_args(argv)
    from modeling_agriclip import AgriCLIPConfig, AgriCLIPProcessor

    processor = AgriCLIPProcessor.from_config(AgriCLIPConfig.tiny())
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            classes = sum(len(source.drawings) for source in pretraining_sources())
            per_class = int(np.ceil(args.limit / classes / 0.9)) + 1  # a tenth of each class is validation
            data = build_embedded_dataset(scratch, pretrain_per_class=per_class, downstream_per_task=8) / "pretrain"
        dataset = load_image_text_dataset(data, split=args.split)
        dataset = dataset.select(range(min(args.limit, len(dataset))))
        paths = [row["image"]["path"] for row in dataset]
        captions = dataset["caption"]
        if any(path is None for path in paths):
            raise ValueError(f"{data}: the benchmark compares against files on disk; this source embeds bytes")
        for path in paths:  # warm the page cache for both sides
            Path(path).read_bytes()
        count = len(paths)

        def loader(collate):
            return DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)

        def data_path_stage1():
            for _ in loader(ImageTextCollator(processor)):
                pass

        def pil_stage1():
            for chunk, texts in zip(batches(paths, args.batch_size), batches(captions, args.batch_size)):
                images = [Image.open(path).convert("RGB") for path in chunk]
                processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)

        def data_path_stage2():
            for _ in loader(ImageCollator(args.size)):
                pass

        def pil_stage2():
            for chunk in batches(paths, args.batch_size):
                arrays = [np.asarray(resize_center_crop(Image.open(p).convert("RGB"), args.size)) for p in chunk]
                torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)

        print(f"{count} images from {data} ({args.split}), batch {args.batch_size}, workers {args.num_workers}")
        for name, ours, reference in (
            ("stage 1: ImageTextCollator + AgriCLIP processor", data_path_stage1, pil_stage1),
            (f"stage 2: ImageCollator({args.size})", data_path_stage2, pil_stage2),
        ):
            ours_rate = best_rate(ours, count, args.repeats)
            reference_rate = best_rate(reference, count, args.repeats)
            print(
                f"{name}: data path {ours_rate:.0f} img/s, plain PIL loop {reference_rate:.0f} img/s, "
                f"ratio {ours_rate / reference_rate:.2f}"
            )


if __name__ == "__main__":
    main()
