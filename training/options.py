"""Command-line options of the training scripts: flags, `--config FILE` values under them, and help that shows every
default.

Imports only the standard library and yaml: a script's `--help` and its argument errors answer before torch,
transformers or datasets load. Each script builds its parser from `script_parser` and `add_runtime_arguments`,
parses with `parse_args`, and only then imports its implementation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from agriclip.errors import SCRIPT_EXIT_CODES


# How to continue a stopped run, as a script run on its own says it; `training.run_all` passes its own.
RESUME_HINT = "run the same command with --resume to continue"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every option's help with its default, unless the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {'none' if default is None else shown})"


def script_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of the training script `module` (`__spec__.name`, also under `python -m`), with `description`
    (its module docstring), every default in its help, and the exit codes of `agriclip.errors.run_command`."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=description, epilog=SCRIPT_EXIT_CODES, formatter_class=HelpFormatter
    )


def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is neither valid YAML nor JSON: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses flags over the values of `--config FILE`: a flag given on the command line wins over the file, and
    the file may give any option, required ones included (e.g. `--train-data`, `--output-dir`)."""
    parser.add_argument(
        "--config", help="YAML or JSON file of option values; flags given on the command line override it."
    )
    # A parser of --config alone: the script's own would stop at its required options before reading the file.
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    config_path = config_only.parse_known_args(argv)[0].config
    if config_path:
        try:
            values = load_config_file(config_path)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"{config_path}: unknown option(s) {unknown}")
        for name in values:
            actions[name].required = False  # given by the file
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model`: where a run starts. Required: leaving it out used to train a small random model silently."""
    parser.add_argument(
        "--model",
        required=True,
        help="What to start from: an AgriCLIP folder or Hub id (e.g. written by `agriclip convert --clip "
        "openai/clip-vit-base-patch16 --dino facebook/dino-vitb16`, or a previous stage's final folder); a "
        "preset name, randomly initialised (tiny, tiny_<backbone> for another backbone family: tiny_resnet, "
        "tiny_dinov2, tiny_convnext; paper, vit_b16); or a JSON file of AgriCLIPConfig "
        'values over a preset, e.g. {"preset": "tiny", "vision_config": {"hidden_size": 64}}.',
    )


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training script shares (each script sets its own defaults with `parser.set_defaults`)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--output-dir", required=True, help="Folder for checkpoints, logs and the exported model.")
    group.add_argument("--seed", type=int, default=0, help="Seed of every random number generator.")
    group.add_argument("--epochs", type=int, default=1, help="Passes over the training data.")
    group.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="Optimizer steps of the run; when given, it replaces --epochs and every schedule spans it.",
    )
    group.add_argument("--batch-size", type=int, default=32, help="Images per process per forward pass.")
    group.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="Forward passes per optimizer step: the gradient is averaged over batch size x processes x this images. "
        "A contrastive loss (stage 1, LoRA's contrastive objective) still contrasts each pass's own batch size x "
        "processes pairs: accumulation averages the gradients of those losses and adds no negatives.",
    )
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="Clip the gradient norm to this (0 disables).")
    group.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Overrides the launcher's setting (default: `accelerate launch --mixed-precision`, or its config, decides). "
        "bf16 runs on the CPU too (autocast; weights and checkpoints stay float32): faster on CPUs with "
        "AVX512-BF16 or AMX-BF16, emulated and often slower elsewhere (`python -m bench.bench_precision` measures it).",
    )
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    group.add_argument(
        "--checkpoint-every", type=int, default=100, help="Save a resumable checkpoint every N optimizer steps."
    )
    group.add_argument("--keep-checkpoints", type=int, default=3, help="Keep only the newest N checkpoints.")
    group.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="Resume from the newest intact checkpoint in --output-dir, or from the given checkpoint folder "
        "(default: start from scratch).",
    )
    group.add_argument(
        "--allow-changed-config",
        action="store_true",
        help="Resume although options that change the result (batch size, learning rate, seed, data, steps, number of "
        "processes, precision...) differ from the checkpoint's; without it such a resume is refused. Paths of "
        "outputs, logging, workers and checkpoint/evaluation frequency may always change.",
    )
    group.add_argument(
        "--log-with",
        default="auto",
        help="Accelerate tracker(s), comma-separated (e.g. tensorboard,wandb); 'auto': tensorboard when installed; "
        "'none'.",
    )


def add_column_arguments(parser: argparse.ArgumentParser, captions: bool = True) -> None:
    """`--image-column`, and `--caption-column` where the stage reads `captions`: the columns of the data
    (`agriclip.sources`' defaults)."""
    parser.add_argument(
        "--image-column",
        default=None,
        help="Image column of the data (default: `filepath` for a CSV, else `image` or the first image feature).",
    )
    if not captions:
        return
    parser.add_argument(
        "--caption-column",
        default=None,
        help="Caption column of the data (default: `title` for a CSV, `txt` for WebDataset shards, else `caption`, or "
        "`text` when there is no `caption`, as `datasets` image folders name captions).",
    )


def held_out_fraction(text: str) -> float:
    """argparse type of a fraction of the data strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction strictly between 0 and 1 is needed, not {text}")
    return value


def add_validation_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--val-data`, `--val-split` and `--val-fraction` of a stage that reports `what` on held-out pairs
    (`training.data.plan_validation` decides from them)."""
    parser.add_argument(
        "--val-data", default=None, help=f"Held-out image-caption pairs for {what} (default: --train-data)."
    )
    parser.add_argument(
        "--val-split",
        default=None,
        help=f"Split of --val-data for {what} (default: `validation`; without --val-data and --val-split, data that "
        "has no `validation` split holds --val-fraction of its training pairs out instead; --val-data of one "
        "split is used whole).",
    )
    parser.add_argument(
        "--val-fraction",
        type=held_out_fraction,
        default=0.05,
        help="Fraction of the training pairs held out, drawn with --seed and not trained on, when the data has no "
        "validation split and neither --val-data nor --val-split is given.",
    )
