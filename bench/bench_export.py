"""The exported ONNX classifier against the PyTorch path it replaces, in one run: images per second and start-up.

A model of `--model`'s layout (random weights, built locally; `tiny` or `paper`, the paper's ViT-B/16 CLIP +
ResNet-50 backbone, or any bench_stage1 layout) is saved once and exported by `agriclip export` (fp32 and int8) for
`--labels` leaf-disease names with one template. `--images` generated PNG photos of `--size` pixels. Sides, each on
the same photos with `--threads` threads and batches of `--batch-size`, one image decoded at a time in this process:

- "onnx fp32" / "onnx int8": the exported runner's `Classifier.classify` (Pillow decoding, numpy preprocessing,
  onnxruntime);
- "pytorch": `agriclip classify-folder`'s `classify_files` on the loaded model with the label embeddings cached
  (decoding, the image processor, the image path of the model), no DataLoader workers.

The sides alternate pass by pass (the one that goes first rotates), so that load from other processes hits all
alike: images per second (min / median / max over `--rounds` passes), the ratios of the medians and per round, and
the top-1 agreement of each ONNX side with PyTorch. Start-up: wall seconds of `python runner.py PHOTO` and of
`agriclip predict PHOTO` in fresh processes (best of 3), loading included. Model file sizes. Run from the
repository root:

    python -m bench.bench_export [--model tiny|paper] [--images 64] [--size 256] [--threads 2] [--rounds 3]
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_inference import write_photos
from bench.bench_multicrop import load_average
from bench.bench_stage1 import bench_config
from modeling_agriclip import AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.commands import classify_files
from modeling_agriclip.export import INT8_MODEL, export_classifier
from modeling_agriclip.zero_shot import ZeroShotClassifier


LABELS = ["leaf rust", "powdery mildew", "early blight", "late blight", "bacterial spot", "healthy leaf"]
TEMPLATES = ["a photo of {}."]


def start_up_seconds(command: list[str], cwd: Path, tries: int = 3) -> float:
    """The best wall time of `command` in a fresh process."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="Layout: tiny, paper, or another bench_stage1 layout.")
    parser.add_argument("--images", type=int, default=64, help="Photos per pass.")
    parser.add_argument("--size", type=int, default=256, help="Side of the square photos.")
    parser.add_argument("--batch-size", type=int, default=32, help="Photos per forward pass.")
    parser.add_argument("--threads", type=int, default=2, help="Threads of torch and of onnxruntime.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed passes per side.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        torch.manual_seed(0)
        config = bench_config(args.model)
        AgriCLIPModel(config).save_pretrained(workdir / "model")
        AgriCLIPProcessor.from_config(config).save_pretrained(workdir / "model")
        files = write_photos(workdir / "photos", args.images, args.size)
        classifier = ZeroShotClassifier.from_pretrained(workdir / "model", batch_size=args.batch_size)
        started = time.perf_counter()
        export = export_classifier(classifier, LABELS, TEMPLATES, workdir / "export", quantize="int8")
        export_seconds = time.perf_counter() - started
        spec = importlib.util.spec_from_file_location("runner", export.folder / "runner.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)

        sides = {
            "onnx fp32": runner.Classifier(export.folder, threads=args.threads),
            "onnx int8": runner.Classifier(export.folder, model=INT8_MODEL, threads=args.threads),
        }
        classifier.label_embeddings(LABELS, TEMPLATES)  # cached, as classify-folder computes them once

        def pytorch_pass() -> list[str]:
            result = classify_files(classifier, files, LABELS, TEMPLATES, 1, args.batch_size, 0, False)
            return [predictions[0]["label"] for predictions in result.predictions]

        def onnx_pass(name: str) -> list[str]:
            return [result[0][0] for _, result in sides[name].classify(files, top_k=1, batch_size=args.batch_size)]

        passes = {"pytorch": pytorch_pass, **{name: (lambda name=name: onnx_pass(name)) for name in sides}}
        for run in passes.values():  # warm-up: first-call allocations and caches
            run()
        seconds = {name: [] for name in passes}
        top1 = {}
        load_before = load_average()
        names = list(passes)
        for round_ in range(args.rounds):
            first = round_ % len(names)
            for name in names[first:] + names[:first]:
                started = time.perf_counter()
                top1[name] = passes[name]()
                seconds[name].append(time.perf_counter() - started)
        load_after = load_average()

        print(
            f"model {args.model}, {args.images} photos of {args.size} px, {len(LABELS)} labels, batch "
            f"{args.batch_size}, {args.threads} threads, {args.rounds} rounds; load average before {load_before}, "
            f"after {load_after}"
        )
        print(f"export: {export_seconds:.1f} s; " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in export.sizes.items()))
        for name, values in seconds.items():
            rates = sorted(args.images / value for value in values)
            print(
                f"  {name:9s} img/s: min {rates[0]:8.1f}  median {statistics.median(rates):8.1f}  max {rates[-1]:8.1f}"
            )
        for name in sides:
            ratio = statistics.median(seconds["pytorch"]) / statistics.median(seconds[name])
            rounds = " ".join(f"{theirs / mine:.2f}" for mine, theirs in zip(seconds[name], seconds["pytorch"]))
            agree = sum(a == b for a, b in zip(top1[name], top1["pytorch"])) / len(files)
            print(f"  {name} / pytorch: {ratio:.2f}x (per round {rounds}); top-1 agreement {agree:.3f}")

        photo = files[0]
        runner_start = start_up_seconds([sys.executable, "runner.py", photo], export.folder)
        predict = [sys.executable, "-m", "agriclip", "predict", photo, "--model", str(workdir / "model")]
        pytorch_start = start_up_seconds([*predict, "--labels", ",".join(LABELS)], Path.cwd())
        print(
            f"start-up (one photo, fresh process, best of 3): runner.py {runner_start:.2f} s, agriclip predict "
            f"{pytorch_start:.2f} s ({pytorch_start / runner_start:.1f}x)"
        )


if __name__ == "__main__":
    main()
