"""Loading the AgriCLIP model a training stage starts from: a checkpoint folder, a Hub id, or a preset."""

from __future__ import annotations

import torch

from modeling_agriclip import AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.convert import PRESETS


def load_model_and_processor(name_or_path: str) -> tuple[AgriCLIPModel, AgriCLIPProcessor]:
    """A preset name (randomly initialised, with the real CLIP tokenizer rebuilt offline) or a saved AgriCLIP folder/Hub id.

    Weights load in float32: precision during training comes from the launcher (mixed precision), never from the file.
    """
    if name_or_path in PRESETS:
        config = PRESETS[name_or_path]()
        return AgriCLIPModel(config), AgriCLIPProcessor.from_config(config)
    model = AgriCLIPModel.from_pretrained(name_or_path, dtype=torch.float32, trust_remote_code=False)
    processor = AgriCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    try:
        processor.check_fits(model.config)
    except ValueError as error:
        raise ValueError(f"{name_or_path}: {error}") from None
    return model, processor
