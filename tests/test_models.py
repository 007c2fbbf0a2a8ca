"""Where a training run starts (training.models): a folder, a preset announced as random weights, or a JSON file of
config values over a preset."""

import json

import pytest
from accelerate import Accelerator

from modeling_agriclip import AgriCLIPConfig
from training.models import load_model_and_processor


@pytest.fixture(autouse=True)
def accelerator():
    return Accelerator(cpu=True)  # the loader announces through accelerate's logger


def test_a_json_file_over_a_preset_sets_the_tower_sizes(tmp_path, caplog):
    path = tmp_path / "towers.json"
    path.write_text(
        json.dumps(
            {"preset": "tiny", "projection_dim": 24, "vision_config": {"hidden_size": 48, "num_hidden_layers": 3}}
        )
    )
    model, processor = load_model_and_processor(str(path))
    tiny = AgriCLIPConfig.tiny()
    assert model.config.projection_dim == 24 and model.aligner.out_features == 24
    assert model.config.vision_config.hidden_size == 48 and len(model.vision_model.encoder.layers) == 3
    # What the file leaves out comes from the preset, sub-config by sub-config.
    assert model.config.vision_config.patch_size == tiny.vision_config.patch_size
    assert model.config.text_config.to_dict() == tiny.text_config.to_dict()
    processor.check_fits(model.config)
    assert "starting from RANDOM weights" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"preset": "huge"}', "unknown preset 'huge'"),
        ("[1, 2]", "expected a JSON object"),
        ('{"image_embedding": "nonsense"}', "do not make an AgriCLIPConfig"),
        ('{"preset": ', "not a readable JSON file"),
    ],
)
def test_a_bad_config_file_is_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"--model {path}: .*{message}"):
        load_model_and_processor(str(path))


def test_a_preset_is_announced_as_random_weights(caplog):
    model, _ = load_model_and_processor("tiny")
    assert "starting from RANDOM weights (tiny: 1.7 M parameters)" in caplog.text
    assert "agriclip convert --clip openai/clip-vit-base-patch16" in caplog.text
