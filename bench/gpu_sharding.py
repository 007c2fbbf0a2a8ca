"""Stage-1 training throughput of the paper-size model on one GPU, in bf16, under each engine the project ships.

The step is the stage-1 script's (`training.contrastive.contrastive_forward` and `training.runtime.train_step` under
an Accelerator, the model made shardable by `training.sharding` as the script does), on the batches of
bench/bench_stage1.py (stage 1's collator over synthetic photos and captions). Each engine trains in its own
`accelerate launch --num_processes 1 --mixed_precision bf16` process, a worker mode of this file:

- `ddp`: plain Accelerate (no config file); with one process Accelerate adds no DDP wrapper, so this is the step that
  multi-GPU DDP scales from, and the reference of the ratios;
- `fsdp2`: training/configs/fsdp2.yaml (PyTorch's `fully_shard` through Accelerate's plugin);
- `zero2`, `zero3`: training/configs/deepspeed_zero2.yaml and deepspeed_zero3.yaml (skipped, with the reason, where
  deepspeed is not installed).

On one GPU nothing is sharded across devices: the numbers say what each engine's machinery costs per step.

Prints, per engine: samples/s (median over the timed steps, after warm-up), the model FLOP/s that rate achieves,
its share of the GPU's bf16 dense peak, and the ratio of samples/s against `ddp` in the same run. FLOPs per sample
are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward and backward of the same step (model FLOPs:
the optimizer's are not counted). The peak comes from `BF16_DENSE_PEAK_TFLOPS` by `torch.cuda.get_device_name()`, or
from --peak-tflops; for another GPU the share is reported as unknown. Without CUDA it prints one line saying so and
exits 0. --output also writes the results as JSON.

    python -m bench.gpu_sharding [--model paper] [--batch-size 64] [--steps 20] [--warmup-steps 5]
        [--engines ddp,fsdp2,zero2,zero3] [--peak-tflops N] [--output results.json]
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from agriclip.atomic import write_json_atomically
from bench.bench_stage1 import BETAS, EPS, LEARNING_RATE, WEIGHT_DECAY, bench_config, make_batches, update_step
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from modeling_agriclip.convert import PRESETS
from training.contrastive import contrastive_forward, trainable_clip
from training.dino import param_groups_without_decay
from training.losses import ContrastiveLoss
from training.runtime import adamw
from training.sharding import is_deepspeed, prepare_for_sharding, register_feature_methods


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
# Engine -> the Accelerate config it launches with (None: plain Accelerate) and the package it needs beyond ours.
ENGINES = {
    "ddp": (None, None),
    "fsdp2": (CONFIGS / "fsdp2.yaml", None),
    "zero2": (CONFIGS / "deepspeed_zero2.yaml", "deepspeed"),
    "zero3": (CONFIGS / "deepspeed_zero3.yaml", "deepspeed"),
}
# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s, by a part of the CUDA device name; the first match counts,
# so the specific names come before the general ones. NVIDIA's datasheets quote the 2:4-sparse rate, twice these:
# H100/H200 (nvidia.com/en-us/data-center/h100/, /h200/: SXM 1,979, PCIe 1,513, NVL 1,671 sparse), A100
# (nvidia.com/en-us/data-center/a100/: 624 sparse), L40S (nvidia.com/en-us/data-center/l40s/: 733 sparse), L40
# (nvidia.com/en-us/data-center/l40/: 362 sparse), L4 (nvidia.com/en-us/data-center/l4/: 242 sparse), A10
# (nvidia.com/en-us/data-center/products/a10-gpu/: 250 sparse).
BF16_DENSE_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # the SXM part ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
# Distinct batches the steps cycle through (the collator pads each to its longest caption).
DISTINCT_BATCHES = 4
# Samples of each batch whose forward and backward FlopCounterMode counts: per sample, the count depends on the
# padded length, which a slice keeps, and not on the batch size but for the similarity matrix of the loss (B x B x
# projection_dim, under 0.01% of a step), so that the count fits beside the workers on a small GPU.
COUNTED_SAMPLES = 8


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The bf16 dense peak of the GPU named `device_name` (`override` when given), None when unknown."""
    if override is not None:
        return override
    return next((peak for part, peak in BF16_DENSE_PEAK_TFLOPS if part in device_name), None)


def peak_share(tflops: float, peak: float | None) -> float | None:
    """The share of the peak that `tflops` achieves, None when the peak is unknown."""
    return None if peak is None else tflops / peak


def flops_per_sample(step: Callable[[], torch.Tensor], batch_size: int) -> float:
    """FLOPs of one forward (`step()`, which returns the loss) and its backward, as FlopCounterMode counts them,
    per sample of a batch of `batch_size`."""
    with FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops() / batch_size


def stage1_flops_per_sample(config: AgriCLIPConfig, batches: list[dict], device: str | torch.device) -> float:
    """Model FLOPs per sample of stage 1's forward and backward on `batches` (their mean), for a model of `config`
    that trains what stage 1 trains; each batch is counted on its first `COUNTED_SAMPLES` samples."""
    model = AgriCLIPModel(config).to(device).train()
    trainable_clip(model, freeze_text=False, freeze_image=False)
    loss_fn = ContrastiveLoss()
    counts = []
    for batch in batches:
        inputs = {key: value[:COUNTED_SAMPLES].to(device) for key, value in batch.items()}
        counts.append(
            flops_per_sample(lambda: contrastive_forward(model, inputs, loss_fn), len(inputs["pixel_values"]))
        )
        model.zero_grad(set_to_none=True)
    return statistics.mean(counts)


def engine_step(config: AgriCLIPConfig, accelerator: Accelerator, batch_size: int) -> Callable[[dict], None]:
    """Stage 1's update of a fresh model of `config`, prepared by `accelerator` as the stage-1 script prepares it
    (`training.contrastive.train`)."""
    model = AgriCLIPModel(config).train()
    trainable_clip(model, freeze_text=False, freeze_image=False)
    model = prepare_for_sharding(accelerator, model)
    optimizer = adamw(
        param_groups_without_decay(model, WEIGHT_DECAY), accelerator.device, lr=LEARNING_RATE, betas=BETAS, eps=EPS
    )
    if is_deepspeed(accelerator):
        # DeepSpeed reads its batch size from the loader `prepare` is given; the batches here come without one.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    register_feature_methods(accelerator, model)
    return update_step(accelerator, model, optimizer)


def worker(args) -> None:
    """One engine's measurement, in the process `accelerate launch` started: writes its result to `args.result`."""
    accelerator = Accelerator()
    config = bench_config(args.model)
    torch.manual_seed(0)
    step = engine_step(config, accelerator, args.batch_size)
    batches = [
        {key: value.to(accelerator.device) for key, value in batch.items()}
        for batch in make_batches(config, args.batch_size, DISTINCT_BATCHES)
    ]
    for index in range(args.warmup_steps):
        step(batches[index % len(batches)])
    seconds = []
    for index in range(args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step(batches[index % len(batches)])
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    result = {
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "samples_per_second": args.batch_size / statistics.median(seconds),
        "step_seconds": seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    write_json_atomically(args.result, result)


def launch_command(engine: str, worker_args: list[str]) -> list[str]:
    """The `accelerate launch` command line of `engine`'s worker (one process, bf16)."""
    config_file, _ = ENGINES[engine]
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    else:
        command += ["--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--num_processes", "1", "--mixed_precision", "bf16", "--main_process_port", "0"]
    return command + ["-m", "bench.gpu_sharding", "--worker", engine, *worker_args]


def run_engine(engine: str, args) -> dict:
    """Runs `engine`'s worker; its result with `status` "ok", or `status` "skipped" / "failed" and the `reason`."""
    _, package = ENGINES[engine]
    if package is not None and importlib.util.find_spec(package) is None:
        return {"status": "skipped", "reason": f"{package} is not installed (pip install {package})"}
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        worker_args = [
            *("--model", args.model, "--batch-size", str(args.batch_size)),
            *("--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--result", str(result)),
        ]
        try:
            process = subprocess.run(
                launch_command(engine, worker_args), cwd=REPO, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"ran past --timeout {args.timeout} s"}
        if process.returncode != 0 or not result.exists():
            tail = [line for line in (process.stderr or process.stdout).splitlines() if line.strip()][-5:]
            return {"status": "failed", "reason": f"exit status {process.returncode}: " + " | ".join(tail)}
        return {"status": "ok", **json.loads(result.read_text())}


def summarise(results: dict[str, dict], flops: float, peak: float | None) -> dict[str, dict]:
    """Each measured engine's result with its achieved TFLOP/s, share of `peak` and ratio against `ddp`."""
    reference = results.get("ddp", {}).get("samples_per_second")
    for result in results.values():
        if result["status"] != "ok":
            continue
        result["tflops"] = result["samples_per_second"] * flops / 1e12
        result["peak_share"] = peak_share(result["tflops"], peak)
        result["vs_ddp"] = None if reference is None else result["samples_per_second"] / reference
    return results


def print_report(results: dict[str, dict], device_name: str, peak: float | None) -> None:
    print(f"{'engine':7s} {'runs as':10s} {'samples/s':>10s} {'TFLOP/s':>8s} {'of peak':>8s} {'vs ddp':>7s}  memory")
    for engine, result in results.items():
        if result["status"] != "ok":
            print(f"{engine:7s} {result['status']}: {result['reason']}")
            continue
        share = "unknown" if result["peak_share"] is None else f"{result['peak_share']:.1%}"
        ratio = "-" if result["vs_ddp"] is None else f"{result['vs_ddp']:.3f}x"
        print(
            f"{engine:7s} {result['distributed_type']:10s} {result['samples_per_second']:10.1f} "
            f"{result['tflops']:8.1f} {share:>8s} {ratio:>7s}  {result['peak_memory_gib']:.1f} GiB"
        )
    if peak is None:
        print(f"the bf16 dense peak of {device_name} is not known here: pass --peak-tflops for the share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="paper", help=f"A preset ({', '.join(sorted(PRESETS))}), small or FILE.json."
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Image-text pairs per step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per engine.")
    parser.add_argument("--warmup-steps", type=int, default=5, help="Untimed steps per engine first.")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"Comma-separated, of {', '.join(ENGINES)}.")
    parser.add_argument("--peak-tflops", type=float, help="The GPU's bf16 dense peak, in place of the table's.")
    parser.add_argument("--timeout", type=int, default=600, help="Seconds each engine's worker may run.")
    parser.add_argument("--output", help="Also write the results to this JSON file.")
    parser.add_argument("--worker", choices=tuple(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not torch.cuda.is_available():
        print("no CUDA device: this check measures stage-1 training throughput on a GPU; nothing was run")
        return
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")

    device_name = torch.cuda.get_device_name()
    peak = peak_tflops(device_name, args.peak_tflops)
    config = bench_config(args.model)
    flops = stage1_flops_per_sample(config, make_batches(config, args.batch_size, DISTINCT_BATCHES), "cuda")
    torch.cuda.empty_cache()
    print(
        f"{device_name} (bf16 dense peak {'unknown' if peak is None else f'{peak:g} TFLOP/s'}); model {args.model}, "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup_steps}; "
        f"{flops / 1e9:.1f} GFLOP per sample (forward + backward, FlopCounterMode)"
    )
    results = summarise({engine: run_engine(engine, args) for engine in engines}, flops, peak)
    print_report(results, device_name, peak)
    if args.output:
        write_json_atomically(
            args.output,
            {
                "device": device_name,
                "peak_tflops": peak,
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup_steps": args.warmup_steps,
                "flops_per_sample": flops,
                "engines": results,
            },
        )


if __name__ == "__main__":
    main()
