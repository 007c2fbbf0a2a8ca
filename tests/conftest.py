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


COLOURS = {"red": (200, 40, 30), "green": (40, 190, 50), "blue": (30, 60, 200), "yellow": (220, 210, 30)}


def write_caption_folder(root, n_train=32, n_validation=16, seed=0):
    """An image folder with metadata.jsonl per split: noisy solid-colour leaves captioned by colour."""
    import json

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for split, count in (("train", n_train), ("validation", n_validation)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for index in range(count):
            name = names[index % len(names)]
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
            rows.append({"file_name": f"{index}.png", "caption": f"a photo of a {name} leaf"})
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return root


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    return write_caption_folder(tmp_path_factory.mktemp("captions"))


def read_metrics(run_dir, run_name):
    """The rows a training run logged to <run_dir>/logs/<run_name>/metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "logs" / run_name / "metrics.jsonl").read_text().splitlines()]
