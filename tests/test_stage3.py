"""Stage 3: fitting the aligner from streamed features, on one and two processes, closed form and SGD recipe."""

import json
import logging
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.alignment
from conftest import read_metrics, run_script
from modeling_agriclip import AgriCLIPModel
from training.stage3_align import main


def run_stage3(model, data, output, *flags):
    return main(["--model", str(model), "--train-data", str(data), "--output-dir", str(output), "--log-with", "none",
                 "--batch-size", "5", *flags])


def test_closed_form_equals_least_squares_on_the_extracted_features(tiny_checkpoint, caption_folder, tmp_path):
    cache = tmp_path / "features"
    final = run_stage3(tiny_checkpoint, caption_folder, tmp_path / "run", "--feature-cache", str(cache))
    features = load_file(cache / "train-0-of-1.safetensors")
    x, y = features["x"].double().numpy(), features["y"].double().numpy()
    assert x.shape == (32, 48) and y.shape == (32, 32)
    # Reference: ordinary least squares with an intercept column (32 samples, 49 unknowns per output: minimum norm).
    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    model = AgriCLIPModel.from_pretrained(final)
    prediction = torch.from_numpy(x).float() @ model.aligner.weight.detach().T + model.aligner.bias.detach()
    np.testing.assert_allclose(prediction.numpy(), design @ solution, atol=1e-3)
    metrics = read_metrics(tmp_path / "run", "stage3_align")[0]
    assert metrics["train/r2"] > 0.99 and 0 < metrics["val/r2"] <= 1
    # The rest of the model is untouched.
    original = AgriCLIPModel.from_pretrained(tiny_checkpoint).state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("aligner."):
            assert torch.equal(value, original[key]), key


def test_a_plain_folder_without_a_validation_split_holds_out_a_seeded_fraction(tiny_checkpoint, caption_folder, tmp_path,
                                                                              capsys):
    """An image folder of one split with `text` captions (the `datasets` convention): the aligner is fitted on 24 of
    the 32 images, exactly (least squares on those alone), and MSE/R² reported on the other 8, which one line names."""
    plain = tmp_path / "plain"
    shutil.copytree(caption_folder / "train", plain)
    rows = [json.loads(line) for line in (plain / "metadata.jsonl").read_text().splitlines()]
    (plain / "metadata.jsonl").write_text("".join(json.dumps({"file_name": row["file_name"], "text": row["caption"]})
                                                  + "\n" for row in rows))
    cache = tmp_path / "features"
    final = run_stage3(tiny_checkpoint, plain, tmp_path / "run", "--feature-cache", str(cache), "--val-fraction", "0.25")
    assert f"validation: {plain} has no split 'validation' (splits: train), so 25% of the training pairs" in capsys.readouterr().out
    train, validation = (load_file(cache / f"{name}-0-of-1.safetensors") for name in ("train", "validation"))
    assert len(train["x"]) == 24 and len(validation["x"]) == 8
    assert not (torch.cdist(train["x"], validation["x"]) == 0).any()  # disjoint
    x, y = train["x"].double().numpy(), train["y"].double().numpy()
    design = np.hstack([x, np.ones((len(x), 1))])
    model = AgriCLIPModel.from_pretrained(final)
    prediction = torch.from_numpy(x).float() @ model.aligner.weight.detach().T + model.aligner.bias.detach()
    np.testing.assert_allclose(prediction.numpy(), design @ np.linalg.lstsq(design, y, rcond=None)[0], atol=1e-3)
    assert 0 < read_metrics(tmp_path / "run", "stage3_align")[0]["val/r2"] < 1


def test_a_missing_validation_split_named_explicitly_fails_before_anything_loads(tiny_checkpoint, caption_folder,
                                                                                tmp_path, monkeypatch):
    monkeypatch.setattr(training.alignment, "load_model_and_processor", lambda *args: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"captions\d*: no split 'test' for validation; splits: \['train', 'validation'\]"):
        run_stage3(tiny_checkpoint, caption_folder, tmp_path, "--val-split", "test")


def test_feature_cache_is_reused_for_the_same_model_and_data_only(tiny_checkpoint, caption_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    run_stage3(tiny_checkpoint, caption_folder, tmp_path / "first", "--feature-cache", str(cache))
    cached = cache / "train-0-of-1.safetensors"
    written = cached.stat().st_mtime_ns
    run_stage3(tiny_checkpoint, caption_folder, tmp_path / "again", "--feature-cache", str(cache))
    assert cached.stat().st_mtime_ns == written  # read, not extracted again

    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_checkpoint, other)
    model = AgriCLIPModel.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for parameter in model.dino_model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(other)
    with caplog.at_level(logging.WARNING):
        from_cache = load_file(run_stage3(other, caption_folder, tmp_path / "other", "--feature-cache", str(cache)) / "model.safetensors")
    assert f"feature cache {cached} was extracted from another model, processor or data" in caplog.text
    fresh = load_file(run_stage3(other, caption_folder, tmp_path / "fresh", "--feature-cache", str(tmp_path / "new-cache"))
                      / "model.safetensors")
    assert torch.equal(from_cache["aligner.weight"], fresh["aligner.weight"])
    assert torch.equal(from_cache["aligner.bias"], fresh["aligner.bias"])


def test_sgd_recipe_and_legacy_bias_scaling(tiny_checkpoint, caption_folder, tmp_path):
    flags = ("--method", "sgd", "--sgd-epochs", "5", "--sgd-batch-size", "8", "--feature-cache", str(tmp_path / "cache"))
    corrected = AgriCLIPModel.from_pretrained(run_stage3(tiny_checkpoint, caption_folder, tmp_path / "a", *flags))
    legacy = AgriCLIPModel.from_pretrained(run_stage3(tiny_checkpoint, caption_folder, tmp_path / "b", *flags, "--legacy-bias-scaling"))
    assert torch.equal(corrected.aligner.weight, legacy.aligner.weight)
    assert not torch.allclose(corrected.aligner.bias, legacy.aligner.bias)
    assert read_metrics(tmp_path / "a", "stage3_align")[0]["val/r2"] > read_metrics(tmp_path / "b", "stage3_align")[0]["val/r2"]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_checkpoint, caption_folder, tmp_path):
    common = ["training.stage3_align", "--model", str(tiny_checkpoint), "--train-data", str(caption_folder),
              "--log-with", "none", "--batch-size", "5", "--ridge", "0.1"]
    two = run_script([*common, "--output-dir", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # 32 images for 49 unknowns per output: the ridge makes the optimum unique, so the two runs can be compared.
    one = run_stage3(tiny_checkpoint, caption_folder, tmp_path / "one", "--ridge", "0.1")
    weights_one = AgriCLIPModel.from_pretrained(one).aligner
    weights_two = AgriCLIPModel.from_pretrained(tmp_path / "two" / "final").aligner
    torch.testing.assert_close(weights_two.weight, weights_one.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights_two.bias, weights_one.bias, atol=1e-5, rtol=1e-5)


def test_sigterm_during_feature_extraction_stops_at_once_and_says_what_is_kept(
        tiny_checkpoint, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback):
    extract = training.alignment.extract_features

    def preempted_while_extracting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        yield from extract(*args, **kwargs)

    monkeypatch.setattr(training.alignment, "extract_features", preempted_while_extracting)
    with pytest.raises(SystemExit) as exit_info:
        run_stage3(tiny_checkpoint, caption_folder, tmp_path / "run")
    assert exit_info.value.code == 143
    assert ("SIGTERM received: stopped; stage 3 keeps no checkpoints; run the same command again to start it over"
            in capsys.readouterr().out)
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback
