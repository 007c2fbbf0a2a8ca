"""Time to the first training step against the size of an image folder: does loading scale to ALive (600k pairs)?

For each size N the bench writes (once, into --root, reused by later runs) an image folder in the ALive builder's
layout: `train/<shard>/<key>.png` with `train/metadata.jsonl` holding N pairs, and `validation/` with N/10, each
image a tiny PNG so that the folder's size is its file count. Then, in a fresh process per size so that no cache
of this process helps, stage 1's data path up to its first batch: `plan_validation` (the split names),
`training.contrastive.build_loaders` (train and validation loaded, `IndexedRows`, the collators with the tiny
AgriCLIP processor) and the first training batch decoded. The time of the whole path is printed per size, with
seconds per 100k pairs, so that linear growth reads as a constant.

Reference, measured in the same run at the smallest size only (it grows too fast to wait for at the others):
`datasets.load_dataset("imagefolder")` of the train and the validation split, which is what
`load_image_text_dataset` called before it indexed image folders itself.

    python bench/bench_first_step.py [--pairs 10000 100000 600000] [--root /tmp/agriclip-first-step] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]

FIRST_STEP = """
import sys, time
from types import SimpleNamespace
from modeling_agriclip import AgriCLIPConfig, AgriCLIPProcessor
from agriclip.images import DecodeStats
from training.contrastive import build_loaders
from training.data import plan_validation
imported = time.perf_counter()
folder = sys.argv[1]
processor = AgriCLIPProcessor.from_config(AgriCLIPConfig.tiny())
args = SimpleNamespace(image_column=None, caption_column=None, batch_size=64, seed=0, num_workers=0)
validation = plan_validation(folder, "train", None, None, 0.1, 0)
train_loader, val_loader, captions = build_loaders(args, validation, processor, DecodeStats())
next(iter(train_loader))
print(time.perf_counter() - imported, len(train_loader.dataset), len(val_loader.dataset))
"""

DATASETS_REFERENCE = """
import sys, time
import datasets
datasets.disable_progress_bars()
started = time.perf_counter()
for split in ("train", "validation"):
    datasets.load_dataset("imagefolder", data_dir=sys.argv[1], split=split)
print(time.perf_counter() - started)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 600_000],
        help="Training pairs per folder (validation: a tenth more).",
    )
    parser.add_argument("--root", default="/tmp/agriclip-first-step", help="Where the folders are written and kept.")
    parser.add_argument("--repeats", type=int, default=3, help="Fresh processes per size.")
    parser.add_argument("--shard-size", type=int, default=1000, help="Images per shard folder, as the ALive builder.")
    return parser.parse_args(argv)


def write_folder(folder: Path, pairs: int, shard_size: int) -> bool:
    """The ALive layout with `pairs` training and `pairs // 10` validation rows, kept once complete; whether it
    had to be written."""
    done = folder / "complete"
    if done.is_file():
        return False
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 160, 40)).save(buffer, "PNG")
    png = buffer.getvalue()
    for split, count in (("train", pairs), ("validation", pairs // 10)):
        rows = []
        for index in range(count):
            name = f"{index // shard_size:05d}/{index:07d}.png"
            (folder / split / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / split / name).write_bytes(png)
            rows.append(
                json.dumps(
                    {"file_name": name, "caption": f"a leaf with early blight, number {index}", "source": "generated"}
                )
            )
        (folder / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    done.write_text("")
    return True


def timed(script: str, folder: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    return result.stdout.split()


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.root)
    print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}; {os.cpu_count()} CPUs")
    for pairs in args.pairs:
        folder = root / f"{pairs}"
        started = time.perf_counter()
        fresh = write_folder(folder, pairs, args.shard_size)
        written = f"written in {time.perf_counter() - started:.0f} s" if fresh else "reused"
        runs = [timed(FIRST_STEP, folder) for _ in range(args.repeats)]
        seconds = [float(run[0]) for run in runs]
        median = statistics.median(seconds)
        print(
            f"{pairs:>7} + {pairs // 10} pairs ({runs[0][1]} train rows, {runs[0][2]} validation rows; folder "
            f"{written}): first batch after "
            f"min {min(seconds):.2f} / median {median:.2f} / max {max(seconds):.2f} s, "
            f"{median / pairs * 100_000:.2f} s per 100k pairs"
        )
        if pairs == min(args.pairs):
            reference = [float(timed(DATASETS_REFERENCE, folder)[0]) for _ in range(args.repeats)]
            print(
                f"{'':>7}   reference datasets.load_dataset('imagefolder') of both splits: min {min(reference):.2f}"
                f" / median {statistics.median(reference):.2f} / max {max(reference):.2f} s; ratio of medians "
                f"{statistics.median(reference) / median:.1f}x"
            )


if __name__ == "__main__":
    main()
