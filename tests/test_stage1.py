"""Stage 1: contrastive training with Accelerate — learning, exact resume, multi-process parity, guards."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, run_script
from training.runtime import NonFiniteLossError
from training.stage1_contrastive import main

RUN = "stage1_contrastive"


def run_stage1(data, output, *flags):
    return main(["--model", "tiny", "--train-data", str(data), "--output-dir", str(output), "--batch-size", "8",
                 "--log-with", "none", *flags])


def test_short_run_learns_and_exports(caption_folder, tmp_path):
    final = run_stage1(caption_folder, tmp_path, "--epochs", "4", "--learning-rate", "1e-3", "--checkpoint-every", "4")
    losses = [row["loss"] for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    recall = read_metrics(tmp_path, RUN)[-1]
    # 16 validation pairs over 4 colours: a caption matches 4 images, so chance text-to-image R@1 is 1/16.
    assert recall["val/text_to_image_R@5"] > 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-16", "checkpoint-8"]


def test_exact_resume(caption_folder, tmp_path):
    flags = ("--max-steps", "6", "--checkpoint-every", "3", "--learning-rate", "1e-3")
    straight = load_file(run_stage1(caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage1(caption_folder, interrupted, *flags)
    # Simulate a run killed after step 3: only the step-3 checkpoint survives.
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-6")
    resumed = load_file(run_stage1(caption_folder, interrupted, *flags, "--resume") / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_frozen_tower_does_not_change(caption_folder, tmp_path):
    from modeling_agriclip import AgriCLIPModel, AgriCLIPConfig

    torch.manual_seed(0)
    initial = AgriCLIPModel(AgriCLIPConfig.tiny()).state_dict()
    final = run_stage1(caption_folder, tmp_path, "--max-steps", "2", "--freeze-text", "--learning-rate", "1e-3")
    trained = AgriCLIPModel.from_pretrained(final).state_dict()
    text_keys = [k for k in trained if k.startswith(("text_model.", "text_projection."))]
    assert text_keys and all(torch.equal(trained[k], initial[k]) for k in text_keys)
    assert not torch.equal(trained["visual_projection.weight"], initial["visual_projection.weight"])
    assert all(torch.equal(trained[k], initial[k]) for k in trained if k.startswith(("dino_model.", "aligner.")))


def test_nan_loss_stops_cleanly(caption_folder, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"optimizer step \d+.*last good checkpoint is .*checkpoint-1"):
        run_stage1(caption_folder, tmp_path, "--max-steps", "6", "--checkpoint-every", "1", "--learning-rate", "1e30",
                   "--max-grad-norm", "0")
    assert not (tmp_path / "final").exists()
    good = sorted((tmp_path / "checkpoints").iterdir())
    assert good and all((c / "trainer_state.json").is_file() for c in good)
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "checkpoints").iterdir())


def test_config_file_values_are_overridden_by_flags(caption_folder, tmp_path):
    config = tmp_path / "stage1.yaml"
    config.write_text("max-steps: 1\nbatch_size: 4\nlearning-rate: 0.5\n")
    run_stage1(caption_folder, tmp_path / "run", "--config", str(config), "--learning-rate", "0.001")
    logged = [row for row in read_metrics(tmp_path / "run", RUN) if "lr" in row]
    assert len(logged) == 1 and logged[0]["lr"] == pytest.approx(0.001)
    config.write_text("max-step: 1\n")
    with pytest.raises(SystemExit):
        run_stage1(caption_folder, tmp_path / "bad", "--config", str(config))


def test_two_processes_match_one_on_the_same_global_batch(caption_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes x batch 4 equals 1 process x batch 8: losses and final weights."""
    common = ["training.stage1_contrastive", "--model", "tiny", "--train-data", str(caption_folder),
              "--max-steps", "2", "--log-with", "none", "--learning-rate", "1e-3"]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert "8 x 1 process(es)" in one.stdout, one.stderr[-3000:]
    losses = {name: [row["loss"] for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")}
    assert losses["one"] == pytest.approx(losses["two"], abs=1e-5)
    weights_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for key in weights_one:
        torch.testing.assert_close(weights_one[key], weights_two[key], atol=1e-5, rtol=1e-4)
