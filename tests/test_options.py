"""The typed options of the training scripts: one parser for command lines, `--config` files and run_all's config
sections, so each way of starting a run converts, checks and defaults its options the same."""

import dataclasses

import pytest
import yaml

from training.lora_finetune import LoraOptions
from training.options import options_from, options_parser, parse_options
from training.stage1_contrastive import ContrastiveOptions
from training.stage2_dino import DinoOptions, apply_recipe
from training.stage3_align import AlignmentOptions


REQUIRED = {"model": "tiny", "train_data": "data/pretrain", "output_dir": "runs/x"}


def command_line(values: dict) -> list[str]:
    """`values` spelled as flags by hand: the independent reading `options_from` must agree with."""
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize(
    "options, values",
    [
        (ContrastiveOptions, {"batch_size": 8, "freeze_text": True, "adam_betas": [0.9, 0.95], "loss": "siglip"}),
        (DinoOptions, {"recipe": "small-data", "out_dim": 512, "koleo_weight": 0.1, "resume": "latest"}),
        (AlignmentOptions, {"objective": "text-mse", "ridge_grid": [0.0, 0.1], "fusion_grid": [0.5]}),
        (LoraOptions, {"towers": ["text", "backbone"], "shots": 4, "templates": ["a photo of {}."]}),
    ],
)
def test_a_config_section_reads_as_the_same_command_line(options, values):
    from_mapping = options_from(options, {**REQUIRED, **values}, "section")
    from_flags = parse_options(options, command_line({**REQUIRED, **values}), prog="test")
    assert from_mapping == from_flags and isinstance(from_mapping, options)
    for name, value in values.items():
        assert getattr(from_mapping, name) == (tuple(value) if isinstance(value, list) else value)


def test_values_are_converted_as_command_line_words():
    # YAML 1.1 reads 5e-5 (no dot) as a string: the option's type converts it, as it would the flag's word.
    section = yaml.safe_load("learning_rate: 5e-5\nepochs: 3\nadam_betas: [0.9, 0.98]")
    assert isinstance(section["learning_rate"], str)
    options = options_from(ContrastiveOptions, {**REQUIRED, **section}, "stage1")
    assert options.learning_rate == 5e-5 and options.epochs == 3 and options.adam_betas == (0.9, 0.98)


def test_defaults_are_each_script_s_own():
    defaults = {
        options: {field.name: field.default for field in dataclasses.fields(options)}
        for options in (ContrastiveOptions, DinoOptions, AlignmentOptions, LoraOptions)
    }
    assert [defaults[options]["batch_size"] for options in defaults] == [32, 64, 64, 16]
    assert defaults[DinoOptions]["epochs"] == 100 and defaults[LoraOptions]["epochs"] == 20
    # A shared option keeps its help where a script changes its default.
    helps = {action.dest: action.help for action in options_parser(DinoOptions, "p")._actions}
    assert helps["batch_size"] == "Images per process per forward pass."


@pytest.mark.parametrize(
    "options, values, message",
    [
        (ContrastiveOptions, {**REQUIRED, "batch_sise": 8}, r"stage1: unknown option\(s\) \['batch_sise'\]"),
        (ContrastiveOptions, {"model": "tiny", "output_dir": "x"}, "stage1: .*--train-data"),
        (ContrastiveOptions, {**REQUIRED, "loss": "hinge"}, "stage1: .*--loss: invalid choice: 'hinge'"),
        (DinoOptions, {**REQUIRED, "knn_bank_split": "train"}, "stage1: --knn-bank-split and --knn-query-split go"),
        (AlignmentOptions, {**REQUIRED, "method": "sgd", "ridge": 0.1}, "stage1: --ridge applies to the closed"),
        (LoraOptions, {**REQUIRED, "suite": "s.yaml"}, "stage1: --suite and --task go together"),
        (ContrastiveOptions, {**REQUIRED, "val_fraction": 1.5}, "stage1: .*--val-fraction: .*strictly between 0 and 1"),
        (ContrastiveOptions, {**REQUIRED, "epochs": 2.5}, "stage1: .*--epochs: invalid int value: '2.5'"),
        (ContrastiveOptions, {**REQUIRED, "freeze_text": "yes"}, "stage1: .*--freeze-text: true or false"),
        (ContrastiveOptions, {**REQUIRED, "seed": [1, 2]}, "stage1: .*--seed: one value is needed"),
    ],
)
def test_bad_sections_are_value_errors_that_name_the_section(options, values, message):
    with pytest.raises(ValueError, match=message):
        options_from(options, values, "stage1")


def test_a_bad_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_options(AlignmentOptions, command_line({**REQUIRED, "method": "sgd", "objective": "text-mse"}), prog="p")
    assert exit_info.value.code == 2
    assert "--method sgd is the paper's recipe for --objective image-mse" in capsys.readouterr().err


def test_the_recipe_is_a_pure_function():
    given = options_from(DinoOptions, {**REQUIRED, "recipe": "small-data", "out_dim": 4096}, "stage2")
    filled = apply_recipe(given)
    assert given.num_local_crops is None and filled.num_local_crops == 4 and filled.out_dim == 4096
    assert apply_recipe(filled) == filled
