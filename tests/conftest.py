"""Shared fixtures: tiny AgriCLIP models built from configs (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_config():
    return AgriCLIPConfig.tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return AgriCLIPModel(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_processor(tiny_config, clip_tokenizer):
    return AgriCLIPProcessor.from_config(tiny_config, tokenizer=clip_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_processor):
    """A saved AgriCLIP folder (model + processor + custom-code files)."""
    path = tmp_path_factory.mktemp("agriclip-tiny")
    tiny_model.save_pretrained(path)
    tiny_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sample_images():
    """Three distinct RGB photos of different sizes."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(80, 100), (64, 64), (120, 90)]]
