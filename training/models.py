"""Loading the AgriCLIP model a training stage starts from: a checkpoint folder, a Hub id, a preset, or a JSON file
of config values over a preset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from huggingface_hub.errors import StrictDataclassError

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.commands import hide_weight_loading_bars
from modeling_agriclip.convert import PRESETS, names_random_weights
from modeling_agriclip.zero_shot import model_source_options


logger = get_logger(__name__)


def _merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` laid over it, nested mappings (the sub-configs) merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def config_from_file(path: str | Path) -> AgriCLIPConfig:
    """An AgriCLIPConfig from a JSON file of values over a preset: `{"preset": "tiny", "vision_config":
    {"hidden_size": 64, "num_hidden_layers": 4}, "projection_dim": 64}` (`preset` defaults to tiny; any field of
    AgriCLIPConfig or of its sub-configs text_config, vision_config and dino_config may be given)."""
    path = Path(path)
    try:
        overrides = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--model {path}: not a readable JSON file of AgriCLIPConfig values ({error})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model {path}: expected a JSON object of AgriCLIPConfig values")
    preset = overrides.pop("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"--model {path}: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    try:
        return AgriCLIPConfig.from_dict(_merged(PRESETS[preset]().to_dict(), overrides))
    except (TypeError, ValueError, StrictDataclassError) as error:  # the config's own field checks
        raise ValueError(f"--model {path}: the values do not make an AgriCLIPConfig: {error}") from None


def load_model_and_processor(name_or_path: str) -> tuple[AgriCLIPModel, AgriCLIPProcessor]:
    """A saved AgriCLIP folder or Hub id, or a randomly initialised model (with the real CLIP tokenizer rebuilt
    offline) from a preset name or a JSON file of config values (`config_from_file`), announced loudly: a run that
    starts from random weights should never pass for one that starts from CLIP.

    Weights load in float32: precision during training comes from the launcher (mixed precision), never from the file.

    Raises:
        OSError: at once for a folder without config.json, or a Hub id offline and not cached or out of reach
            (`modeling_agriclip.zero_shot.model_source_options`), saying what to do.
        ValueError: for a JSON file that makes no AgriCLIPConfig, or a processor that does not fit the model.
    """
    if names_random_weights(name_or_path):
        config = PRESETS[name_or_path]() if name_or_path in PRESETS else config_from_file(name_or_path)
        model = AgriCLIPModel(config)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        logger.warning(
            f"starting from RANDOM weights ({name_or_path}: {parameters / 1e6:.1f} M parameters), not from a pretrained "
            "model; to start from CLIP, build a folder with `agriclip convert --clip openai/clip-vit-base-patch16 "
            "--output DIR` and pass --model DIR",
            main_process_only=True,
        )
        return model, AgriCLIPProcessor.from_config(config)
    options = model_source_options(name_or_path)  # a folder without config.json, or a Hub out of reach: at once
    hide_weight_loading_bars()
    # transformers does not pass local_files_only on to its lookup of a PEFT adapter.
    model = AgriCLIPModel.from_pretrained(
        name_or_path, dtype=torch.float32, trust_remote_code=False, **options, adapter_kwargs=options
    )
    processor = AgriCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False, **options)
    try:
        processor.check_fits(model.config)
    except ValueError as error:
        raise ValueError(f"{name_or_path}: {error}") from None
    return model, processor
