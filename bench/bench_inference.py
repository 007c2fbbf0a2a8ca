"""Zero-shot inference throughput: `agriclip classify-folder` against the transformers pipeline, printed as ratios.

Same model, images and labels on every side, measured in one run: a model of `--model`'s layout (random weights,
built locally, nothing downloaded; by default bench_stage1's `small`, whose towers dominate the cost as at real
sizes) saved once to a temporary folder, `--images` generated PNG photos of `--size` pixels, and
`--labels` class names with the one template "a photo of {}.".

Sides:

- `agriclip classify-folder`: the command (model loading, label embeddings computed once, images decoded and
  preprocessed by the DataLoader, in decoding workers where the machine has cores to spare, batched forward of the
  image tower alone, CSV written); steady state: the same inference through `classify_files` with the model loaded
  and the label embeddings cached;
- the reference of the headline: the `zero-shot-image-classification` pipeline on the same AgriCLIP folder, called
  on the list of photos with the labels and `batch_size=--batch-size`, as a user who batches calls it (it still
  encodes the label prompts with every batch of images);
- the same pipeline called without `batch_size` (one image per forward, the label prompts re-encoded for every
  image), as usually called;
- the batched pipeline on a transformers `CLIPModel` with the same text and image tower sizes: what the pipeline
  costs without AgriCLIP.

Measures:

- "cold img/s": loading plus one pass over the photos, each side in its own fresh process (the command-line
  experience; loading is a fixed cost, so the cold ratio grows with `--images` towards the warm one);
- "warm img/s": models loaded once in this process, then `--repeats` rounds that run every side in turn (interleaved,
  so that a change of load on a shared machine hits every side alike): min / median / max over the rounds, and the
  ratios of the medians and of each round's passes (the sides of one round ran one after the other);
- "CPU ms/img": CPU time of the warm passes (all threads and DataLoader workers) per image, steadier than wall time
  on a shared machine;
- peak memory of each cold process: `resource.getrusage(RUSAGE_SELF).ru_maxrss` (resident set: Python, torch, the
  model, activations; tracemalloc does not see torch allocations), the same after imports alone (the baseline every
  side pays), the largest DataLoader worker (`RUSAGE_CHILDREN`; workers share their parent's pages copy-on-write, so
  this overstates what they add), and on CUDA `torch.cuda.max_memory_allocated`.

The top-1 agreement of the command and the batched pipeline on the same model is printed as a check that both
compute the same predictions.

    python bench/bench_inference.py [--model small|tiny|vit_b16|paper|FILE.json] [--images 64] [--labels 20]
        [--batch-size 32] [--num-workers N] [--device cpu|cuda] [--threads N] [--repeats 3]
"""

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# Run as a plain script from anywhere: the repository root holds the packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = "a photo of {}."
LABELS = (
    "leaf rust",
    "powdery mildew",
    "early blight",
    "late blight",
    "bacterial spot",
    "leaf mold",
    "septoria leaf spot",
    "spider mites",
    "mosaic virus",
    "healthy leaf",
    "nitrogen deficiency",
    "potassium deficiency",
    "weeds",
    "tilapia",
    "salmon",
    "catfish",
    "Holstein cow",
    "Jersey cow",
    "Angus cattle",
    "chicken droppings",
    "yellow leaf curl",
    "target spot",
    "anthracnose",
    "scab",
    "black rot",
    "canker",
    "downy mildew",
    "fresh fish",
    "stale fish",
    "goat",
)
SIDES = (
    "agriclip classify-folder",
    "pipeline (AgriCLIP), batched",
    "pipeline (AgriCLIP), unbatched",
    "pipeline (CLIPModel), batched",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="small",
        help="Layout of the model: small (bench_stage1's), a preset or a JSON file of AgriCLIPConfig values over one.",
    )
    parser.add_argument("--images", type=int, default=64, help="Number of generated photos.")
    parser.add_argument("--size", type=int, default=256, help="Side of the generated photos in pixels.")
    parser.add_argument("--labels", type=int, default=20, help=f"Number of class names (at most {len(LABELS)}).")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="Images per forward of the command and of the batched pipelines."
    )
    parser.add_argument(
        "--num-workers", type=int, default=None, help="Decoding workers of the command (default: the command's own)."
    )
    parser.add_argument("--device", default="cpu", help="Device of every side.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of every side (default: torch's). On a machine shared with other jobs, 1 keeps "
        "the many small operations of the per-image pipeline from waiting on descheduled threads.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved warm rounds.")
    # Internal: the child processes that build the models and photos, and that run one side cold.
    parser.add_argument("--task", choices=("prepare", *SIDES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(workdir: Path, args) -> None:
    """Saves the AgriCLIP model, a CLIPModel of the same tower sizes, both processors, and the photos."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from bench.bench_stage1 import bench_config
    from modeling_agriclip import AgriCLIPModel, AgriCLIPProcessor

    torch.manual_seed(0)
    config = bench_config(args.model)
    processor = AgriCLIPProcessor.from_config(config)
    AgriCLIPModel(config).save_pretrained(workdir / "agriclip")
    processor.save_pretrained(workdir / "agriclip")
    clip_config = CLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
    )
    CLIPModel(clip_config).save_pretrained(workdir / "clip")
    clip_processor = CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    clip_processor.save_pretrained(workdir / "clip")

    write_photos(workdir / "photos", args.images, args.size)


def write_photos(folder: Path, count: int, size: int) -> list[str]:
    """`count` PNG photos of `size` x `size` pixels in `folder`: smooth colour fields with noise, photo-like file
    sizes unlike pure noise. Returns their paths, in order."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    ramp = np.linspace(0, 1, size)[None, :, None]
    for index in range(count):
        base = rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 255, 3) * (1 - ramp.transpose(1, 0, 2))
        pixels = np.clip(base / 2 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return [str(folder / f"{index:04d}.png") for index in range(count)]


def max_rss_mib(who=resource.RUSAGE_SELF) -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(who).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _pipeline(side: str, args):
    """The pipeline of a pipeline side and the keyword arguments of its calls."""
    from transformers import pipeline

    model = args.workdir / ("clip" if "CLIPModel" in side else "agriclip")
    classifier = pipeline("zero-shot-image-classification", model=str(model), device=args.device)
    batch = {"batch_size": args.batch_size} if side.endswith(", batched") else {}
    return classifier, {"candidate_labels": list(LABELS[: args.labels]), "hypothesis_template": TEMPLATE, **batch}


def set_threads(args) -> None:
    """Applies `--threads` to this process."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def cold_pass(side: str, args, files: list[str]) -> list[str]:
    """Loads the side's model and classifies every photo once, as a user would; returns the top-1 labels."""
    from agriclip.cli import main

    if side == "agriclip classify-folder":
        output = args.workdir / "predictions.csv"
        argv = ["classify-folder", str(args.workdir / "photos"), "--labels", ",".join(LABELS[: args.labels])]
        argv += ["--template", TEMPLATE, "--model", str(args.workdir / "agriclip"), "--output", str(output)]
        argv += ["--device", args.device, "--batch-size", str(args.batch_size)]
        argv += [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]
        if main(argv) != 0:
            raise RuntimeError(f"agriclip {' '.join(argv)} failed")
        with open(output, newline="") as handle:
            return [row["label"] for row in csv.DictReader(handle)]
    classifier, kwargs = _pipeline(side, args)
    return [ranked[0]["label"] for ranked in classifier(files, **kwargs)]


def warm_runner(side: str, args, files: list[str]):
    """Loads the side's model; returns a function that classifies every photo."""
    import torch

    from modeling_agriclip.commands import classify_files, load_classifier

    if side == "agriclip classify-folder":
        classifier = load_classifier(str(args.workdir / "agriclip"), torch.device(args.device), args.batch_size)
        labels = list(LABELS[: args.labels])
        return lambda: classify_files(classifier, files, labels, [TEMPLATE], 1, args.batch_size, args.num_workers)
    classifier, kwargs = _pipeline(side, args)
    return lambda: classifier(files, **kwargs)


def measure_cold(args) -> dict:
    """One side in its own process: cold images per second, top-1 labels and peak memory."""
    import torch

    from modeling_agriclip.commands import find_images

    import_rss, import_children_rss = max_rss_mib(), max_rss_mib(resource.RUSAGE_CHILDREN)
    set_threads(args)
    files, _ = find_images([str(args.workdir / "photos")])
    start = time.perf_counter()
    top1 = cold_pass(args.task, args, files)
    seconds = time.perf_counter() - start
    # transformers starts a helper process at import: only a larger child is a DataLoader worker.
    children_rss = max_rss_mib(resource.RUSAGE_CHILDREN)
    return {
        "cold_images_per_s": len(files) / seconds,
        "top1": top1,
        "peak_rss_mib": max_rss_mib(),
        "import_rss_mib": import_rss,
        "worker_peak_rss_mib": children_rss if children_rss > import_children_rss else None,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None,
    }


def run_task(task: str, workdir: Path, argv: list[str]) -> dict | None:
    """Runs `task` in a child process; returns what it printed as JSON (None for `prepare`).

    Linux keeps a process's peak RSS across fork and exec, so a child of a process holding models would start with
    its parent's peak: children are started before this process imports torch.
    """
    command = [sys.executable, __file__, *argv, "--task", task, "--workdir", str(workdir)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1]) if task != "prepare" else None


def measure_warm(args) -> dict[str, dict]:
    """Every side loaded in this process; `--repeats` interleaved rounds after one warm-up pass each. Returns each
    side's images per second of every round, in round order, and its CPU time per image."""
    from modeling_agriclip.commands import find_images

    set_threads(args)
    files, _ = find_images([str(args.workdir / "photos")])
    runners = {side: warm_runner(side, args, files) for side in SIDES}
    for run in runners.values():
        run()
    seconds = {side: [] for side in SIDES}
    cpu = dict.fromkeys(SIDES, 0.0)
    for _ in range(args.repeats):
        for side, run in runners.items():
            start_cpu, start = cpu_seconds(), time.perf_counter()
            run()
            seconds[side].append(time.perf_counter() - start)
            cpu[side] += cpu_seconds() - start_cpu
    return {
        side: {
            "warm_images_per_s": [len(files) / value for value in seconds[side]],
            "warm_cpu_ms_per_image": 1000 * cpu[side] / (args.repeats * len(files)),
        }
        for side in SIDES
    }


def ratio_line(cli: dict, other: dict) -> str:
    """classify-folder against one other side: warm (ratio of the medians, then of each round's passes), cold, and
    CPU time per image."""
    cli_warm, other_warm = cli["warm_images_per_s"], other["warm_images_per_s"]
    per_round = " ".join(f"{mine / theirs:.2f}" for mine, theirs in zip(cli_warm, other_warm))
    return (
        f"warm {statistics.median(cli_warm) / statistics.median(other_warm):.2f}x (per round: {per_round}), "
        f"cold {cli['cold_images_per_s'] / other['cold_images_per_s']:.2f}x, "
        f"CPU time per image {other['warm_cpu_ms_per_image'] / cli['warm_cpu_ms_per_image']:.2f}x less"
    )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.task == "prepare":
        prepare(args.workdir, args)
        return
    if args.task is not None:
        print(json.dumps(measure_cold(args)))
        return
    if not 1 <= args.labels <= len(LABELS):
        raise SystemExit(f"--labels must lie in [1, {len(LABELS)}]")
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = Path(scratch)
        run_task("prepare", args.workdir, argv)
        launcher_rss = max_rss_mib()
        results = {side: run_task(side, args.workdir, argv) for side in SIDES}
        for side, warm in measure_warm(args).items():
            results[side].update(warm)

    print(
        f"{args.images} PNG photos {args.size}x{args.size}, {args.labels} labels, template {TEMPLATE!r}, model "
        f"{args.model}, device {args.device}, {args.threads or 'default'} threads, batch {args.batch_size}; cold = "
        f"loading + one pass in a fresh process, warm = {args.repeats} interleaved passes with the models loaded"
    )
    header = ("cold img/s", "warm min", "warm median", "warm max", "CPU ms/img", "peak RSS", "after imports", "worker")
    print(f"{'side':<32}" + "".join(f"{name:>14}" for name in header))
    for side, result in results.items():
        warm = result["warm_images_per_s"]
        values = (
            result["cold_images_per_s"],
            min(warm),
            statistics.median(warm),
            max(warm),
            result["warm_cpu_ms_per_image"],
        )
        cells = [f"{value:.1f}" for value in values]
        cells += [f"{result[key]:.0f} MiB" for key in ("peak_rss_mib", "import_rss_mib")]
        cells.append("-" if result["worker_peak_rss_mib"] is None else f"{result['worker_peak_rss_mib']:.0f} MiB")
        cuda = "" if result["cuda_peak_mib"] is None else f"  cuda peak {result['cuda_peak_mib']:.0f} MiB"
        print(f"{side:<32}" + "".join(f"{cell:>14}" for cell in cells) + cuda)
    cli, reference = results[SIDES[0]], SIDES[1]
    print(
        f"headline, classify-folder / {reference} (batch_size={args.batch_size}, the same labels): "
        + ratio_line(cli, results[reference])
    )
    for side in SIDES[2:]:
        print(f"classify-folder / {side}: " + ratio_line(cli, results[side]))
    agree = sum(a == b for a, b in zip(cli["top1"], results[reference]["top1"]))
    print(f"top-1 agreement of classify-folder and the batched pipeline on the same model: {agree}/{len(cli['top1'])}")
    print(
        "Memory: peak resident set (ru_maxrss) of each side's cold process; 'after imports' is its baseline before "
        "any model is loaded; 'worker' is the largest DataLoader worker (shares pages with its parent; '-' when none "
        f"ran). The processes were started from a launcher of {launcher_rss:.0f} MiB (Linux carries the peak over)."
    )


if __name__ == "__main__":
    main()
