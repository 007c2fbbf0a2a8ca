"""Time of one `classification_metrics` call (the suite's inner loop) against the `evaluate`-module path it replaced.

Seeded random scores for `--num-images` images x `--num-classes` classes (default 10,000 x 1,000, with the
reference class pushed up so that the metrics are far from chance), timed over `--rounds` rounds each: min, median
and max per call, the ratio of the medians, whether both give the same metrics, and the machine's load average
(other work on the machine slows both sides). Run from the repository root (or with the package installed):

    python -m bench.bench_metrics --num-classes 1000 --num-images 10000 --rounds 5
"""

import argparse
import os
import statistics
import time

import torch

from evaluation.metrics import classification_metrics, classification_metrics_from_modules


def _times(function, scores, labels, num_classes, rounds):
    results, seconds = None, []
    for _ in range(rounds):
        start = time.perf_counter()
        results = function(scores, labels, num_classes)
        seconds.append(time.perf_counter() - start)
    return results, seconds


def _line(name, seconds):
    return (
        f"{name:<34} min {min(seconds):8.3f} s   median {statistics.median(seconds):8.3f} s   "
        f"max {max(seconds):8.3f} s   ({len(seconds)} rounds)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference-rounds", type=int, default=3, help="rounds of the slow evaluate-module path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, args.num_classes, (args.num_images,), generator=generator)
    scores = torch.randn(args.num_images, args.num_classes, generator=generator)
    scores[torch.arange(args.num_images), labels] += 2.0

    print(
        f"{args.num_images} images x {args.num_classes} classes, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    classification_metrics(scores, labels, args.num_classes)  # warm-up
    fast, fast_seconds = _times(classification_metrics, scores, labels, args.num_classes, args.rounds)
    reference, reference_seconds = _times(
        classification_metrics_from_modules, scores, labels, args.num_classes, args.reference_rounds
    )
    print(_line("classification_metrics (tensors)", fast_seconds))
    print(_line("evaluate modules (reference)", reference_seconds))
    print(
        f"ratio of medians (reference / tensors): {statistics.median(reference_seconds) / statistics.median(fast_seconds):.1f}x"
    )
    print(f"tensors:   {fast}")
    print(f"reference: {reference}")
    print(f"identical: {fast == reference}")
    print(f"load average after:  {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
