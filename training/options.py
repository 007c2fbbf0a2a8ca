"""Typed, documented options of the training scripts: dataclasses whose fields are also command-line flags.

Each script declares its options as a `kw_only` dataclass of `option(...)` fields, built from the shared sections
below (`ModelOption`, `OutputOptions`, `LoopOptions`, ...). `parse_options` reads them from a command line (with
`--config FILE` values under the flags), `options_from` from a mapping (`training.run_all`'s config sections), both
through the same parser: the same conversions, defaults and errors whichever way a run is started. A script's
`--help` and its argument errors answer before torch, transformers or datasets load: this module imports only the
standard library and yaml. (transformers' `HfArgumentParser` does the same from dataclasses, but importing it
loads transformers, 1.5 s before any `--help`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from agriclip.errors import SCRIPT_EXIT_CODES


# How to continue a stopped run, as a script run on its own says it; `training.run_all` passes its own.
RESUME_HINT = "run the same command with --resume to continue"

REQUIRED = dataclasses.MISSING


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


def option(
    help: str,
    default=REQUIRED,
    *,
    flag: str | None = None,
    choices: typing.Sequence | None = None,
    parse: typing.Callable[[str], object] | None = None,
    const=None,
    metavar: str | tuple[str, ...] | None = None,
    group: str | None = None,
):
    """A field of an options dataclass, and the command-line flag that sets it.

    The annotation gives the flag's form: `bool` a switch (`flag`, e.g. `--no-norm-last-layer`, names the one of a
    field that defaults to True), `tuple[T, T]` two words, `tuple[T, ...]` one or more, `Literal[...]` its choices,
    `T | None` an optional `T`. `parse` converts a word instead of `T` (e.g. with a range check), `const` is the
    value of the flag given without a word, `group` the section of `--help` it is listed in. Without `default` the
    option is required.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "parse": parse, "const": const, "metavar": metavar}
    return dataclasses.field(default=default, metadata={**metadata, "group": group})


def redefault(options: type, name: str, default):
    """The option `name` of the options class `options`, with a script's own default (e.g. stage 2's batch size)."""
    return dataclasses.field(default=default, metadata=options.__dataclass_fields__[name].metadata)


def _word_form(annotation) -> tuple[type, object, tuple | None]:
    """(type of one word, nargs, choices) of an annotation."""
    arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
        arguments = typing.get_args(annotation)
    nargs = None
    if typing.get_origin(annotation) is tuple:
        nargs = "+" if arguments[-1] is Ellipsis else len(arguments)
        annotation = arguments[0]
        arguments = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return type(arguments[0]), nargs, arguments
    return annotation, nargs, None


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors, when `raises` is set, are ValueErrors naming where the options came from
    (e.g. a section of a run config) instead of a usage message and exit 2."""

    def __init__(self, *args, raises: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raises = raises

    def error(self, message: str):
        if self.raises:
            raise ValueError(f"{self.prog}: {message}")
        super().error(message)


def options_parser(options: type, prog: str, description: str | None = None, raises: bool = False) -> OptionParser:
    """The parser of an options dataclass: one flag per field (`option`), `--config FILE`, every default in the help,
    and the exit codes of `agriclip.errors.run_command`."""
    parser = OptionParser(
        prog=prog, description=description, epilog=SCRIPT_EXIT_CODES, formatter_class=HelpFormatter, raises=raises
    )
    hints = typing.get_type_hints(options)
    groups: dict[str, argparse._ArgumentGroup] = {}
    # Options of no group first: the usage line starts with what the script is about, not with the runtime's.
    for field in sorted(dataclasses.fields(options), key=lambda field: field.metadata["group"] is not None):
        meta = field.metadata
        word, nargs, choices = _word_form(hints[field.name])
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kwargs = {"dest": field.name, "help": meta["help"]}
        if field.default is REQUIRED:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
        if word is bool:
            kwargs["action"] = "store_false" if field.default else "store_true"
        else:
            kwargs |= {"type": meta["parse"] or word, "choices": meta["choices"] or choices, "metavar": meta["metavar"]}
            if meta["const"] is not None:
                kwargs |= {"nargs": "?", "const": meta["const"]}
            elif nargs is not None:
                kwargs["nargs"] = nargs
        group = meta["group"]
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        target.add_argument(flag, **kwargs)
    parser.add_argument(
        "--config", help="YAML or JSON file of option values; flags given on the command line override it."
    )
    return parser


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


def _converted(parser: OptionParser, action: argparse.Action, value):
    """A value given by a mapping, converted and checked (type, range, choices) as the flag's words would be."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            parser.error(f"argument {action.option_strings[0]}: true or false is needed, not {value!r}")
        return value
    single = action.nargs in (None, "?")
    if single and isinstance(value, (list, tuple)):
        parser.error(f"argument {action.option_strings[0]}: one value is needed, not the list {value!r}")
    words = [str(value)] if single else [str(word) for word in value]
    try:
        return parser._get_values(action, words)
    except argparse.ArgumentError as error:
        parser.error(str(error))


def _parse(options: type, parser: OptionParser, argv: list[str] | None, values: Mapping, source: str | None):
    """`options` from `argv` over `values` (read from `source`, when a file): a flag wins over a value, a value may
    give a required option, and the dataclass's own checks (`__post_init__`) fail as argument errors."""
    unknown = sorted(set(values) - {field.name for field in dataclasses.fields(options)})
    if unknown:
        parser.error(f"{source + ': ' if source else ''}unknown option(s) {unknown}")
    actions = {action.dest: action for action in parser._actions}
    for name in values:
        actions[name].required = False
    parser.set_defaults(**{name: _converted(parser, actions[name], value) for name, value in values.items()})
    given = vars(parser.parse_args(argv))
    given.pop("config")
    try:
        return options(**{name: tuple(value) if isinstance(value, list) else value for name, value in given.items()})
    except ValueError as error:
        parser.error(str(error))


def parse_options(options: type, argv: list[str] | None = None, *, prog: str, description: str | None = None):
    """The `options` dataclass of a command line (default: `sys.argv`), over the values of its `--config FILE`."""
    parser = options_parser(options, prog, description)
    # A parser of --config alone: the script's own would stop at its required options before reading the file.
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    config_path = config_only.parse_known_args(argv)[0].config
    values = {}
    if config_path:
        try:
            values = load_config_file(config_path)
        except (OSError, ValueError) as error:
            parser.error(str(error))
    return _parse(options, parser, argv, values, config_path)


def options_from(options: type, values: Mapping, where: str):
    """The `options` dataclass of a mapping of option names to values, checked and converted as command-line
    values are; errors are ValueErrors that start with `where` (e.g. "run config section stage2")."""
    return _parse(options, options_parser(options, where, raises=True), [], values, None)


def held_out_fraction(text: str) -> float:
    """argparse type of a fraction of the data strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction strictly between 0 and 1 is needed, not {text}")
    return value


@dataclass(kw_only=True)
class ModelOption:
    # Required: leaving it out used to train a small random model silently.
    model: str = option(
        "What to start from: an AgriCLIP folder or Hub id (e.g. written by `agriclip convert --clip "
        "openai/clip-vit-base-patch16 --dino facebook/dino-vitb16`, or a previous stage's final folder); a "
        "preset name, randomly initialised (tiny, tiny_<backbone> for another backbone family: tiny_resnet, "
        "tiny_dinov2, tiny_convnext; paper, vit_b16); or a JSON file of AgriCLIPConfig "
        'values over a preset, e.g. {"preset": "tiny", "vision_config": {"hidden_size": 64}}.'
    )


@dataclass(kw_only=True)
class ImageColumnOption:
    image_column: str | None = option(
        "Image column of the data (default: `filepath` for a CSV, else `image` or the first image feature).", None
    )


@dataclass(kw_only=True)
class ColumnOptions(ImageColumnOption):
    """The columns of image-caption data (`agriclip.sources`' defaults)."""

    caption_column: str | None = option(
        "Caption column of the data (default: `title` for a CSV, `txt` for WebDataset shards, else `caption`, or "
        "`text` when there is no `caption`, as `datasets` image folders name captions).",
        None,
    )


@dataclass(kw_only=True)
class ValidationOptions:
    """The held-out pairs of a stage that validates (`training.data.plan_validation` decides from them)."""

    val_data: str | None = option("Held-out image-caption pairs to validate on (default: --train-data).", None)
    val_split: str | None = option(
        "Split of --val-data to validate on (default: `validation`; without --val-data and --val-split, data that "
        "has no `validation` split holds --val-fraction of its training pairs out instead; --val-data of one "
        "split is used whole).",
        None,
    )
    val_fraction: float = option(
        "Fraction of the training pairs held out, drawn with --seed and not trained on, when the data has no "
        "validation split and neither --val-data nor --val-split is given.",
        0.05,
        parse=held_out_fraction,
    )


@dataclass(kw_only=True)
class OutputOptions:
    """What every stage shares, the training loop or not: where it writes, its seed, batches and precision."""

    output_dir: str = option("Folder for checkpoints, logs and the exported model.", group="runtime")
    seed: int = option("Seed of every random number generator.", 0, group="runtime")
    batch_size: int = option("Images per process per forward pass.", 32, group="runtime")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        "Overrides the launcher's setting (default: `accelerate launch --mixed-precision`, or its config, decides). "
        "bf16 runs on the CPU too (autocast; weights, checkpoints and stage 3's statistics stay float32 or "
        "float64): faster on CPUs with AVX512-BF16 or AMX-BF16, emulated and often slower elsewhere "
        "(`python -m bench.bench_precision` measures it).",
        None,
        group="runtime",
    )
    num_workers: int = option("DataLoader worker processes.", 0, group="runtime")
    log_with: str = option(
        "Accelerate tracker(s), comma-separated (e.g. tensorboard,wandb); 'auto': tensorboard when installed; 'none'.",
        "auto",
        group="runtime",
    )


@dataclass(kw_only=True)
class LoopOptions(OutputOptions):
    """The options of `training.loop.train_loop`: how long, how each step is taken, checkpoints and resume."""

    epochs: int = option("Passes over the training data.", 1, group="runtime")
    max_steps: int | None = option(
        "Optimizer steps of the run; when given, it replaces --epochs and every schedule spans it.",
        None,
        group="runtime",
    )
    gradient_accumulation_steps: int = option(
        "Forward passes per optimizer step: the gradient is averaged over batch size x processes x this images. "
        "A contrastive loss (stage 1, LoRA's contrastive objective) still contrasts each pass's own batch size x "
        "processes pairs: accumulation averages the gradients of those losses and adds no negatives.",
        1,
        group="runtime",
    )
    max_grad_norm: float = option("Clip the gradient norm to this (0 disables).", 1.0, group="runtime")
    checkpoint_every: int = option("Save a resumable checkpoint every N optimizer steps.", 100, group="runtime")
    keep_checkpoints: int = option("Keep only the newest N checkpoints.", 3, group="runtime")
    resume: str | None = option(
        "Resume from the newest intact checkpoint in --output-dir, or from the given checkpoint folder "
        "(default: start from scratch).",
        None,
        const="latest",
        group="runtime",
    )
    allow_changed_config: bool = option(
        "Resume although options that change the result (batch size, learning rate, seed, data, steps, number of "
        "processes, precision...) differ from the checkpoint's; without it such a resume is refused. Paths of "
        "outputs, logging, workers and checkpoint/evaluation frequency may always change.",
        False,
        group="runtime",
    )
