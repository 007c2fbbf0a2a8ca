"""Fit time and peak memory of each stage-3 alignment objective against the streamed closed form of `image-mse`.

The image-mse sides fit the same synthetic features: x is ReLU-like (`relu(z + 0.5)`, z standard normal, so its mean
and spread are of one size, as for pooled ResNet features) and `y = x A + noise`. The closed form never holds the
features: a source yields batches that `AlignerStatistics.update` folds in, then `fit_closed_form` solves. The
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

Peak memory. Each method runs in a fresh spawned process, after its imports and after the data source has built its
fixed tables (the mapping and caption targets that stand in for the images); the quality metrics are computed after
the peaks are read. Torch's CPU allocator is invisible to tracemalloc, so two measures are taken:

- torch allocations (the closed form and the SGD recipe, whose ratios are the point): a run under `torch.profiler`
  with `profile_memory=True`; the largest sum of live torch allocations over its allocation and free events is what
  the method's tensors needed at once, features included where the method holds them and the source's batch
  buffers included (one batch, as a data loader holds it). Exact and repeatable: the primary measure;
- resident set (every method): the kernel's peak (`VmHWM`) is reset to the current resident set
  (`/proc/self/clear_refs`) before the first run, and the peak after it minus the resident set at the reset is
  what the machine had to give: the tensors plus what the libraries page in on first use (code, MKL's buffers,
  thread stacks) and what glibc keeps of freed memory, which other work on the machine can also vary.

The theoretical working set of the streamed closed form is what its mathematics holds: the statistics (`sxx`,
D_in x D_in, and `sxy`, D_in x D_out, float64), the solution (D_in x D_out, float64) and one batch as the source
yields it (batch x (D_in + D_out), float32; the source's noise buffer is not counted); the per-dimension vectors
are left out (under 0.1 %). Both peaks are given against it. Timings (min / median / max over `--repeats` runs, the
measured first one included, the profiled one not) exclude the generation of the data for every side.
"""

import argparse
import math
import multiprocessing
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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
MIB = 2**20


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
        "--contrastive-epochs",
        type=int,
        default=CONTRASTIVE_EPOCHS,
        help="Contrastive head epochs (stage 3's default: 20); fewer are projected.",
    )
    parser.add_argument(
        "--num-captions", type=int, default=20_000, help="Distinct caption sets of the text objectives."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each method (the first is measured).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data, the SGD recipe and the head.")
    return parser.parse_args(argv)


class SyntheticPairs:
    """The image-mse pairs: the same `(x, y)` float32 batches on every pass, generated on the fly into one set of
    buffers (a batch is valid until the next one is drawn), so that the source holds one batch, as a data loader
    does. The mapping is drawn when the source is built."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        generator = torch.Generator().manual_seed(args.seed)
        self.mapping = torch.randn(args.in_features, args.out_features, generator=generator) / args.in_features**0.5
        self.state = generator.get_state()

    def __iter__(self):
        args = self.args
        generator = torch.Generator()
        generator.set_state(self.state)
        rows = min(args.batch_size, args.num_samples)
        x, y, noise = (
            torch.empty(rows, args.in_features),
            torch.empty(rows, args.out_features),
            torch.empty(rows, args.out_features),
        )
        for start in range(0, args.num_samples, args.batch_size):
            rows = min(args.batch_size, args.num_samples - start)
            x_batch = torch.randn(rows, args.in_features, generator=generator, out=x[:rows]).add_(0.5).relu_()
            y_batch = torch.mm(x_batch, self.mapping, out=y[:rows])
            y_batch.add_(torch.randn(rows, args.out_features, generator=generator, out=noise[:rows]), alpha=args.noise)
            yield x_batch, y_batch


class SyntheticCaptions:
    """The text objectives' data, `(x, targets, groups)` float32/int64 batches, the same on every pass, into one set
    of buffers: each image's caption set `groups`, whose target is a unit vector, and features that depend on it. The
    caption targets and the mapping are drawn when the source is built."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        generator = torch.Generator().manual_seed(args.seed + 1)
        self.targets = torch.nn.functional.normalize(
            torch.randn(args.num_captions, args.out_features, generator=generator), dim=-1
        )
        self.mapping = torch.randn(args.out_features, args.in_features, generator=generator)
        self.state = generator.get_state()

    def __iter__(self):
        args = self.args
        generator = torch.Generator()
        generator.set_state(self.state)
        rows = min(args.batch_size, args.num_samples)
        x, noise = torch.empty(rows, args.in_features), torch.empty(rows, args.in_features)
        targets, groups = torch.empty(rows, args.out_features), torch.empty(rows, dtype=torch.long)
        for start in range(0, args.num_samples, args.batch_size):
            rows = min(args.batch_size, args.num_samples - start)
            group_batch = torch.randint(args.num_captions, (rows,), generator=generator, out=groups[:rows])
            target_batch = torch.index_select(self.targets, 0, group_batch, out=targets[:rows])
            x_batch = torch.mm(target_batch, self.mapping, out=x[:rows])
            torch.randn(rows, args.in_features, generator=generator, out=noise[:rows])
            yield x_batch.add_(noise[:rows], alpha=4.0).add_(0.5).relu_(), target_batch, group_batch


def memory_kib() -> dict[str, int]:
    """Current (`VmRSS`) and peak (`VmHWM`) resident set size of this process, from the Linux kernel."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def reset_peak() -> int:
    """Resets the kernel's peak resident set of this process to the current one; returns the current (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_kib()["VmRSS"]


def torch_peak_bytes(function) -> int:
    """The largest sum of live torch allocations while `function` runs (what it allocates beyond what was live)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def closed_form_working_set(args: argparse.Namespace) -> int:
    """Bytes of the streamed closed form's theoretical working set (see the module's docstring)."""
    d_in, d_out = args.in_features, args.out_features
    return 8 * (d_in * d_in + 2 * d_in * d_out) + 4 * min(args.batch_size, args.num_samples) * (d_in + d_out)


def measured(name: str, args: argparse.Namespace, profiled: bool) -> dict:
    """Runs the method `METHODS[name]`: a function of `args` returning `(setup, run)`, where `setup()` builds the data
    source and `run(source)` fits and returns a dict with its `seconds` (and their parts, if any) and `report`, which
    computes the fit's quality. The first run is measured by the resident set, then `report` is called; with
    `profiled`, one more run is measured by the torch allocations; then come the other timed runs. Returns the
    first run's dict with the report, the peaks, the times and `median`, the run of the median time."""
    setup, run = METHODS[name](args)
    source = setup()
    baseline = reset_peak()
    first = run(source)
    first["peak_kib"] = memory_kib()["VmHWM"] - baseline
    first |= first.pop("report")()
    if profiled:
        first["torch_peak_bytes"] = torch_peak_bytes(lambda: run(source))
    runs = [first] + [run(source) for _ in range(args.repeats - 1)]
    first["times"] = sorted(result["seconds"] for result in runs)
    median = sorted(runs, key=lambda result: result["seconds"])[len(runs) // 2]
    first["median"] = {key: value for key, value in median.items() if isinstance(value, float)}
    return first


def streamed_statistics(pairs, args: argparse.Namespace) -> tuple[AlignerStatistics, float]:
    """The statistics of `pairs`, batches of (features, targets), and the seconds `update` took; as in stage 3, the
    last batch is not held once they are complete."""
    stats = AlignerStatistics(args.in_features, args.out_features)
    seconds = 0.0
    for x, y in pairs:
        start = time.perf_counter()
        stats.update(x, y)
        seconds += time.perf_counter() - start
    return stats, seconds


def closed_form_method(data, pick):
    def method(args):
        def run(source):
            stats, seconds = streamed_statistics((pick(batch) for batch in source), args)
            start = time.perf_counter()
            weights = fit_closed_form(stats)
            seconds += time.perf_counter() - start
            return {"seconds": seconds, "report": lambda: {"metrics": stats.metrics(weights)}}

        return lambda: data(args), run

    return method


closed_form = closed_form_method(SyntheticPairs, lambda batch: batch)
text_mse = closed_form_method(SyntheticCaptions, lambda batch: batch[:2])


def contrastive(args: argparse.Namespace):
    """The `contrastive` objective as stage 3 runs it: the features in memory, their statistics, the text-mse closed
    form, then the head. For the projection, the set-up (statistics and closed form) is timed apart, and so is one
    no-grad pass of the head's loss over the data (the head computes two, before and after its epochs)."""
    # Loaded before the clock and the memory baseline, as in stage 3: the head's loss module pulls in transformers.
    from training.losses import CaptionTargetInfoNCE

    def run(source):
        x = torch.empty(args.num_samples, args.in_features)
        targets = torch.empty(args.num_samples, args.out_features)
        groups = torch.empty(args.num_samples, dtype=torch.long)
        start = 0
        for x_batch, target_batch, group_batch in source:
            rows = slice(start, start + len(x_batch))
            x[rows], targets[rows], groups[rows] = x_batch, target_batch, group_batch
            start += len(x_batch)
        del x_batch, target_batch, group_batch  # the source's buffers
        begin = time.perf_counter()
        stats = AlignerStatistics(args.in_features, args.out_features)
        for rows in range(0, args.num_samples, args.batch_size):
            stats.update(x[rows : rows + args.batch_size], targets[rows : rows + args.batch_size])
        closed = fit_closed_form(stats)
        setup_seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        fit = fit_contrastive_head(
            x,
            targets,
            groups,
            closed,
            LOGIT_SCALE,
            epochs=args.contrastive_epochs,
            batch_size=CONTRASTIVE_BATCH_SIZE,
            seed=args.seed,
        )
        head_seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        with torch.no_grad():
            loss_fn = CaptionTargetInfoNCE()
            for rows in torch.arange(args.num_samples).split(CONTRASTIVE_BATCH_SIZE):
                loss_fn(
                    torch.nn.functional.linear(x[rows], fit.weights.weight, fit.weights.bias),
                    targets[rows],
                    groups[rows],
                    LOGIT_SCALE,
                )
        pass_seconds = time.perf_counter() - begin
        return {
            "seconds": setup_seconds + head_seconds,
            "setup_seconds": setup_seconds,
            "pass_seconds": pass_seconds,
            "report": lambda: {"start_loss": fit.start_loss, "final_loss": fit.final_loss},
        }

    return lambda: SyntheticCaptions(args), run


def sgd_recipe(args: argparse.Namespace):
    def run(source):
        x = torch.empty(args.num_samples, args.in_features)
        y = torch.empty(args.num_samples, args.out_features)
        start = 0
        for x_batch, y_batch in source:
            x[start : start + len(x_batch)], y[start : start + len(y_batch)] = x_batch, y_batch
            start += len(x_batch)
        del x_batch, y_batch  # the source's buffers
        begin = time.perf_counter()
        c1, _ = variance_scales(x, y)
        scale_seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        weights = fit_sgd_recipe(x, y, epochs=args.sgd_epochs, seed=args.seed)
        seconds = time.perf_counter() - begin

        def report():
            # The original export's bias is b′·c1/c2 where the exact one is b′/c2: the same fit, bias times c1.
            legacy = AlignerWeights(weight=weights.weight, bias=weights.bias * c1)
            return {
                "metrics": aligner_metrics(weights, x, y),
                "legacy_metrics": aligner_metrics(legacy, x, y),
                "c1": c1,
            }

        return {"seconds": seconds, "scale_seconds": scale_seconds, "report": report}

    return lambda: SyntheticPairs(args), run


METHODS = {"closed form": closed_form, "text-mse": text_mse, "contrastive": contrastive, "sgd": sgd_recipe}


def in_fresh_process(name: str, args: argparse.Namespace, profiled: bool = False) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measured, (name, args, profiled))


def spread(result: dict) -> str:
    return (
        f"min {result['times'][0]:7.2f} / median {result['median']['seconds']:7.2f} / max {result['times'][-1]:7.2f} s"
    )


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"{args.num_samples:,} x {args.in_features} -> {args.out_features} float32 features, batches of "
        f"{args.batch_size}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
        f"{load_average()} (1, 5, 15 min) at the start"
    )
    closed = in_fresh_process("closed form", args, profiled=True)
    sgd = in_fresh_process("sgd", args, profiled=True)
    text = in_fresh_process("text-mse", args)
    head = in_fresh_process("contrastive", args)

    working_set = closed_form_working_set(args)
    statistics_bytes = 8 * args.in_features * (args.in_features + args.out_features)
    print(
        f"image-mse streamed closed form:  {spread(closed)}  peak RSS {closed['peak_kib'] / 1024:7.1f} MiB  "
        f"torch {closed['torch_peak_bytes'] / MIB:7.1f} MiB  r2 {closed['metrics']['r2']:.5f}  "
        f"r2_global {closed['metrics']['r2_global']:.5f}"
    )
    print(
        f"  theoretical working set {working_set / MIB:.1f} MiB (statistics {statistics_bytes / MIB:.1f} + solution "
        f"{8 * args.in_features * args.out_features / MIB:.1f} + one float32 batch "
        f"{(working_set - statistics_bytes - 8 * args.in_features * args.out_features) / MIB:.1f}): peak torch "
        f"allocations / working set {closed['torch_peak_bytes'] / working_set:.3f}, peak RSS / working set "
        f"{closed['peak_kib'] * 1024 / working_set:.3f}"
    )
    print(
        f"SGD recipe, {args.sgd_epochs} epoch(s), in memory:  {spread(sgd)}  peak RSS "
        f"{sgd['peak_kib'] / 1024:7.1f} MiB  torch {sgd['torch_peak_bytes'] / MIB:7.1f} MiB  "
        f"r2 {sgd['metrics']['r2']:.5f}  r2_global {sgd['metrics']['r2_global']:.5f}"
    )
    print(
        f"  same fit, legacy bias export (c1 = {sgd['c1']:.3f}): r2 {sgd['legacy_metrics']['r2']:.5f}  "
        f"r2_global {sgd['legacy_metrics']['r2_global']:.5f}"
    )
    sgd_seconds = sgd["median"]["seconds"]
    if args.sgd_epochs != PAPER_EPOCHS:
        scale_seconds = sgd["median"]["scale_seconds"]
        per_epoch = (sgd_seconds - scale_seconds) / args.sgd_epochs
        sgd_seconds = scale_seconds + per_epoch * PAPER_EPOCHS
        print(
            f"NOTE: SGD ran {args.sgd_epochs} epoch(s), not the paper's {PAPER_EPOCHS}. Its time below is PROJECTED "
            f"from the median run: {per_epoch:.1f} s/epoch x {PAPER_EPOCHS} + {scale_seconds:.1f} s scale "
            f"computation = {sgd_seconds:.1f} s; its R² is that of {args.sgd_epochs} epoch(s)."
        )
    print(
        f"text-mse streamed closed form:   {spread(text)}  peak RSS {text['peak_kib'] / 1024:7.1f} MiB  "
        f"r2 {text['metrics']['r2']:.5f}"
    )
    head_seconds = head["median"]["seconds"]
    print(
        f"contrastive head, {args.contrastive_epochs} epoch(s), in memory: {spread(head)}  peak RSS "
        f"{head['peak_kib'] / 1024:7.1f} MiB  InfoNCE {head['start_loss']:.4f} (closed form) -> "
        f"{head['final_loss']:.4f}  ({head['median']['setup_seconds']:.1f} s statistics and closed form)"
    )
    if args.contrastive_epochs != CONTRASTIVE_EPOCHS:
        fixed = head["median"]["setup_seconds"] + 2 * head["median"]["pass_seconds"]
        per_epoch = (head_seconds - fixed) / args.contrastive_epochs
        head_seconds = fixed + per_epoch * CONTRASTIVE_EPOCHS
        print(
            f"NOTE: the head ran {args.contrastive_epochs} epoch(s), not stage 3's {CONTRASTIVE_EPOCHS}. Its time below "
            f"is PROJECTED from the median run: {per_epoch:.1f} s/epoch x {CONTRASTIVE_EPOCHS} + {fixed:.1f} s "
            f"(statistics, closed form and the head's two loss passes) = {head_seconds:.1f} s; its loss is that of "
            f"{args.contrastive_epochs} epoch(s)."
        )
    print(f"load average at the end: {load_average()}")
    closed_seconds = closed["median"]["seconds"]
    print(
        f"SGD recipe / image-mse closed form, peak memory: torch allocations "
        f"{sgd['torch_peak_bytes'] / closed['torch_peak_bytes']:.2f}x, "
        f"RSS {sgd['peak_kib'] / closed['peak_kib']:.2f}x"
    )
    print("ratios to the image-mse closed form of this run (median time, peak RSS):")
    rows = [
        (f"SGD recipe ({PAPER_EPOCHS} epochs)", sgd_seconds, sgd["peak_kib"]),
        ("text-mse closed form", text["median"]["seconds"], text["peak_kib"]),
        (f"contrastive head ({CONTRASTIVE_EPOCHS} epochs)", head_seconds, head["peak_kib"]),
    ]
    for name, seconds, peak in rows:
        print(f"  {name:32s} time {seconds / closed_seconds:7.2f}x   memory {peak / closed['peak_kib']:7.2f}x")


if __name__ == "__main__":
    main()
