"""Fit time and peak memory of each stage-3 alignment objective against the streamed closed form of `image-mse`.

The image-mse sides fit the same synthetic features: x is ReLU-like (`relu(z + 0.5)`, z standard normal, so its mean
and spread are of one size, as for pooled ResNet features) and `y = x A + noise`. The closed form never holds the
features: a generator yields batches that `AlignerStatistics.update` folds in, then `fit_closed_form` solves. The
SGD recipe (the reference, as the paper runs it) holds all features in memory. R² is the training-set R² of both
(`"r2"` per-dimension-mean definition, and the paper's `"r2_global"`), plus the paper recipe with the original
code's bias export.

The text objectives fit synthetic caption data of the same size: each image has one of `--num-captions` caption
sets, whose target is a unit vector, and `x = relu(target B + noise + 0.5)`. `text-mse` streams like the closed form
(only the target differs); `contrastive` holds the features, their targets and caption groups in memory, fits the
text-mse closed form, then trains the head (`fit_contrastive_head`, stage 3's defaults). Every time and peak is also
given as a ratio to the image-mse closed form of the same run, and the machine's load average is printed (other
work on the machine slows every side). Run from the repository root (or with the package installed):

    python -m bench.bench_aligner --num-samples 100000 --sgd-epochs 70 --contrastive-epochs 20

The recipe's 70 epochs (and the head's 20) over 100,000 samples take long on a small CPU: with fewer epochs the
time is also projected to the full count (set-up + per-epoch time x epochs), and the output says so.
"""

import argparse
import math
import multiprocessing
import os
import time

import torch

from training.aligner import (
    AlignerStatistics,
    AlignerWeights,
    aligner_metrics,
    fit_closed_form,
    fit_contrastive_head,
    fit_sgd_recipe,
    variance_scales,
)


PAPER_EPOCHS = 70
# Stage 3's --contrastive-epochs default (training.stage3_align), what a contrastive time is projected to, and the
# head's batch size (fit_contrastive_head's default, as stage 3's).
CONTRASTIVE_EPOCHS = 20
CONTRASTIVE_BATCH_SIZE = 256
# CLIP's initial temperature, 1/0.07: the head's fixed temperature here.
LOGIT_SCALE = math.log(1 / 0.07)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=100_000, help="Number of synthetic feature pairs.")
    parser.add_argument("--in-features", type=int, default=2048, help="Source (backbone) feature size.")
    parser.add_argument("--out-features", type=int, default=512, help="Target (CLIP embedding) feature size.")
    parser.add_argument("--batch-size", type=int, default=1000, help="Rows per batch fed to the streamed fit.")
    parser.add_argument("--noise", type=float, default=0.5, help="Standard deviation of the noise added to y.")
    parser.add_argument(
        "--sgd-epochs", type=int, default=PAPER_EPOCHS, help="SGD recipe epochs (the paper: 70); fewer are projected."
    )
    parser.add_argument(
        "--contrastive-epochs", type=int, default=CONTRASTIVE_EPOCHS,
        help="Contrastive head epochs (stage 3's default: 20); fewer are projected.",
    )
    parser.add_argument("--num-captions", type=int, default=20_000, help="Distinct caption sets of the text objectives.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data, the SGD recipe and the head.")
    return parser.parse_args(argv)


def synthetic_batches(args: argparse.Namespace):
    """Yields the same `(x, y)` float32 batches on every call, generated on the fly."""
    generator = torch.Generator().manual_seed(args.seed)
    mapping = torch.randn(args.in_features, args.out_features, generator=generator) / args.in_features**0.5
    for start in range(0, args.num_samples, args.batch_size):
        rows = min(args.batch_size, args.num_samples - start)
        x = torch.relu(torch.randn(rows, args.in_features, generator=generator) + 0.5)
        y = x @ mapping + args.noise * torch.randn(rows, args.out_features, generator=generator)
        yield x, y


def synthetic_caption_batches(args: argparse.Namespace):
    """Yields the same `(x, targets, groups)` float32/int64 batches on every call: each image's caption set `groups`,
    whose target is a unit vector, and features that depend on it."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    targets = torch.nn.functional.normalize(torch.randn(args.num_captions, args.out_features, generator=generator), dim=-1)
    mapping = torch.randn(args.out_features, args.in_features, generator=generator)
    for start in range(0, args.num_samples, args.batch_size):
        rows = min(args.batch_size, args.num_samples - start)
        groups = torch.randint(args.num_captions, (rows,), generator=generator)
        noise = torch.randn(rows, args.in_features, generator=generator)
        yield torch.relu(targets[groups] @ mapping + 4.0 * noise + 0.5), targets[groups], groups


def memory_kib() -> dict[str, int]:
    """Current (`VmRSS`) and peak (`VmHWM`) resident set size of this process, from the Linux kernel."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


# Peak memory method: torch's CPU allocator is invisible to tracemalloc, and large tensors are mmap-ed and given
# back to the kernel when freed, so the process's resident set is the honest measure. Each method runs in a fresh
# spawned process; its peak resident set (VmHWM, exact, kept by the kernel) minus the resident set after imports
# (VmRSS before the method touches any data) is the memory the method needed, features included where the method
# needs them in memory. Timings exclude data generation for both sides.


def streamed_closed_form(pairs) -> dict:
    """The streamed closed form over `pairs`, batches of (features, targets): time and peak memory of the fit, and
    its training-set metrics."""
    baseline = memory_kib()["VmRSS"]
    stats = None
    seconds = 0.0
    for x, y in pairs:
        start = time.perf_counter()
        stats = stats or AlignerStatistics(x.shape[1], y.shape[1])
        stats.update(x, y)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    weights = fit_closed_form(stats)
    seconds += time.perf_counter() - start
    peak = memory_kib()["VmHWM"] - baseline
    return {"seconds": seconds, "peak_kib": peak, "metrics": stats.metrics(weights)}


def run_closed_form(args: argparse.Namespace) -> dict:
    return streamed_closed_form(synthetic_batches(args))


def run_text_mse(args: argparse.Namespace) -> dict:
    return streamed_closed_form((x, targets) for x, targets, _ in synthetic_caption_batches(args))


def run_contrastive(args: argparse.Namespace) -> dict:
    """The `contrastive` objective as stage 3 runs it: the features in memory, their statistics, the text-mse closed
    form, then the head. For the projection, the set-up (statistics and closed form) is timed apart, and so is one
    no-grad pass of the head's loss over the data (the head computes two, before and after its epochs)."""
    # Loaded before the clock and the memory baseline, as in stage 3: the head's loss module pulls in transformers.
    from training.losses import CaptionTargetInfoNCE

    baseline = memory_kib()["VmRSS"]
    x = torch.empty(args.num_samples, args.in_features)
    targets = torch.empty(args.num_samples, args.out_features)
    groups = torch.empty(args.num_samples, dtype=torch.long)
    start = 0
    for x_batch, target_batch, group_batch in synthetic_caption_batches(args):
        rows = slice(start, start + len(x_batch))
        x[rows], targets[rows], groups[rows] = x_batch, target_batch, group_batch
        start += len(x_batch)
    begin = time.perf_counter()
    stats = AlignerStatistics(args.in_features, args.out_features)
    for rows in range(0, args.num_samples, args.batch_size):
        stats.update(x[rows : rows + args.batch_size], targets[rows : rows + args.batch_size])
    closed = fit_closed_form(stats)
    setup_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    fit = fit_contrastive_head(x, targets, groups, closed, LOGIT_SCALE, epochs=args.contrastive_epochs,
                               batch_size=CONTRASTIVE_BATCH_SIZE, seed=args.seed)
    head_seconds = time.perf_counter() - begin
    peak = memory_kib()["VmHWM"] - baseline
    begin = time.perf_counter()
    with torch.no_grad():
        loss_fn = CaptionTargetInfoNCE()
        for rows in torch.arange(args.num_samples).split(CONTRASTIVE_BATCH_SIZE):
            loss_fn(torch.nn.functional.linear(x[rows], fit.weights.weight, fit.weights.bias), targets[rows],
                    groups[rows], LOGIT_SCALE)
    pass_seconds = time.perf_counter() - begin
    return {"seconds": setup_seconds + head_seconds, "setup_seconds": setup_seconds, "head_seconds": head_seconds,
            "pass_seconds": pass_seconds, "peak_kib": peak, "start_loss": fit.start_loss, "final_loss": fit.final_loss}


def run_sgd_recipe(args: argparse.Namespace) -> dict:
    baseline = memory_kib()["VmRSS"]
    x = torch.empty(args.num_samples, args.in_features)
    y = torch.empty(args.num_samples, args.out_features)
    start = 0
    for x_batch, y_batch in synthetic_batches(args):
        x[start : start + len(x_batch)], y[start : start + len(y_batch)] = x_batch, y_batch
        start += len(x_batch)
    begin = time.perf_counter()
    c1, _ = variance_scales(x, y)
    scale_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    weights = fit_sgd_recipe(x, y, epochs=args.sgd_epochs, seed=args.seed)
    seconds = time.perf_counter() - begin
    peak = memory_kib()["VmHWM"] - baseline
    # The original export's bias is b′·c1/c2 where the exact one is b′/c2: the same fit, bias times c1.
    legacy = AlignerWeights(weight=weights.weight, bias=weights.bias * c1)
    return {
        "seconds": seconds,
        "scale_seconds": scale_seconds,
        "peak_kib": peak,
        "metrics": aligner_metrics(weights, x, y),
        "legacy_metrics": aligner_metrics(legacy, x, y),
        "c1": c1,
    }


def in_fresh_process(function, args: argparse.Namespace) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, (args,))


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"{args.num_samples:,} x {args.in_features} -> {args.out_features} float32 features, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{load:.2f}' for load in os.getloadavg())} (1, 5, 15 min) at the start"
    )
    closed = in_fresh_process(run_closed_form, args)
    sgd = in_fresh_process(run_sgd_recipe, args)
    text = in_fresh_process(run_text_mse, args)
    contrastive = in_fresh_process(run_contrastive, args)

    sgd_seconds = sgd["seconds"]
    print(
        f"streamed closed form (batches of {args.batch_size}):  {closed['seconds']:8.1f} s  "
        f"peak {closed['peak_kib'] / 1024:8.1f} MiB  r2 {closed['metrics']['r2']:.5f}  "
        f"r2_global {closed['metrics']['r2_global']:.5f}"
    )
    print(
        f"SGD recipe, {args.sgd_epochs} epoch(s), in memory:    {sgd_seconds:8.1f} s  "
        f"peak {sgd['peak_kib'] / 1024:8.1f} MiB  r2 {sgd['metrics']['r2']:.5f}  "
        f"r2_global {sgd['metrics']['r2_global']:.5f}"
    )
    print(
        f"  same fit, legacy bias export (c1 = {sgd['c1']:.3f}):                          "
        f"r2 {sgd['legacy_metrics']['r2']:.5f}  r2_global {sgd['legacy_metrics']['r2_global']:.5f}"
    )
    if args.sgd_epochs != PAPER_EPOCHS:
        per_epoch = (sgd_seconds - sgd["scale_seconds"]) / args.sgd_epochs
        sgd_seconds = sgd["scale_seconds"] + per_epoch * PAPER_EPOCHS
        print(
            f"NOTE: SGD ran {args.sgd_epochs} epoch(s), not the paper's {PAPER_EPOCHS}. Its time below is PROJECTED: "
            f"{per_epoch:.1f} s/epoch x {PAPER_EPOCHS} + {sgd['scale_seconds']:.1f} s scale computation = "
            f"{sgd_seconds:.1f} s; its R² is that of {args.sgd_epochs} epoch(s)."
        )
    print(
        f"text-mse closed form (batches of {args.batch_size}):     {text['seconds']:8.1f} s  "
        f"peak {text['peak_kib'] / 1024:8.1f} MiB  r2 {text['metrics']['r2']:.5f}"
    )
    contrastive_seconds = contrastive["seconds"]
    print(
        f"contrastive head, {args.contrastive_epochs} epoch(s), in memory: {contrastive_seconds:8.1f} s  "
        f"peak {contrastive['peak_kib'] / 1024:8.1f} MiB  InfoNCE {contrastive['start_loss']:.4f} (closed form) -> "
        f"{contrastive['final_loss']:.4f}  ({contrastive['setup_seconds']:.1f} s statistics and closed form)"
    )
    if args.contrastive_epochs != CONTRASTIVE_EPOCHS:
        fixed = contrastive["setup_seconds"] + 2 * contrastive["pass_seconds"]
        per_epoch = (contrastive["head_seconds"] - 2 * contrastive["pass_seconds"]) / args.contrastive_epochs
        contrastive_seconds = fixed + per_epoch * CONTRASTIVE_EPOCHS
        print(
            f"NOTE: the head ran {args.contrastive_epochs} epoch(s), not stage 3's {CONTRASTIVE_EPOCHS}. Its time below "
            f"is PROJECTED: {per_epoch:.1f} s/epoch x {CONTRASTIVE_EPOCHS} + {fixed:.1f} s (statistics, closed form "
            f"and the head's two loss passes) = {contrastive_seconds:.1f} s; its loss is that of "
            f"{args.contrastive_epochs} epoch(s)."
        )
    print(f"load average at the end: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print("ratios to the image-mse closed form (time, peak RSS):")
    rows = [(f"SGD recipe ({PAPER_EPOCHS} epochs)", sgd_seconds, sgd["peak_kib"]),
            ("text-mse closed form", text["seconds"], text["peak_kib"]),
            (f"contrastive head ({CONTRASTIVE_EPOCHS} epochs)", contrastive_seconds, contrastive["peak_kib"])]
    for name, seconds, peak in rows:
        print(f"  {name:32s} time {seconds / closed['seconds']:7.2f}x   memory {peak / closed['peak_kib']:7.2f}x")


if __name__ == "__main__":
    main()
