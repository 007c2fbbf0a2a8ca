"""Fit a task file for `agriclip predict --calibration`: a temperature (and SigLIP bias) from k shots per class,
and optionally the image embedding chosen from the same shots.

Command line::

    python -m evaluation.calibrate --config suite.yaml --dataset leaf-condition \\
        --model runs/final [--embedding aligned | --select-on k-shot] --shots 16 [--seed 0] --output leaf.json

The shots come from the dataset's `train_split`, or, without one, from the train half of the seeded stratified split
the suite's probes use (`evaluation.runner.probe_split` with the same seed), so a suite run with that seed never tests
on them. The file's labels are the dataset's prompt names, its templates the dataset's: predict with
``--labels "<the prompt names>"`` (comma-separated) and no --template.
"""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from agriclip import IMAGE_EMBEDDINGS
from agriclip.errors import SCRIPT_EXIT_CODES, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.calibrate",
        description=__doc__,
        epilog=SCRIPT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="Suite YAML that lists the dataset.")
    parser.add_argument("--dataset", required=True, help="The dataset's name in the suite YAML.")
    parser.add_argument("--model", required=True, help="AgriCLIP or transformers CLIP folder.")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--embedding", choices=IMAGE_EMBEDDINGS, default=None, help="Image embedding (default: the checkpoint's)."
    )
    choice.add_argument(
        "--select-on",
        choices=("k-shot",),
        default=None,
        help="Choose the image embedding and fusion weight from the shots (`evaluation.selection`).",
    )
    parser.add_argument("--shots", type=int, default=16, help="Labelled shots per class (default: 16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shots and of the probe split (default: 0).")
    parser.add_argument("--output", required=True, type=Path, help="The task file to write (JSON).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default: 32).")
    parser.add_argument("--device", default=None, help="Device (default: cuda when available, else cpu).")
    return parser


def main(argv: Sequence[str] | None = None):
    """Fits and writes the task file; returns it."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .runner import fit_task_file

    task = fit_task_file(
        args.config,
        args.dataset,
        args.model,
        shots=args.shots,
        seed=args.seed,
        embedding=args.embedding,
        select=args.select_on is not None,
        batch_size=args.batch_size,
        device=args.device,
    )
    task.save(args.output)
    chosen = f"{task.embedding}" + ("" if task.fusion_weight is None else f"@{task.fusion_weight:g}")
    print(f"wrote {args.output}: temperature {task.temperature:.4g}, bias {task.bias:.4g}, embedding {chosen}")
    return task


if __name__ == "__main__":
    from evaluation.calibrate import main as package_main

    run_command(package_main, __spec__.name)
