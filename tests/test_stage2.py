"""Stage 2: DINO training with Accelerate — exports, exact resume, multi-process parity, collapse guard, k-NN,
preemption."""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import training.distillation
from conftest import read_metrics, run_script, write_labelled_folder
from modeling_agriclip import AgriCLIPModel
from training.distillation import CollapseError
from training.stage2_dino import main

RUN = "stage2_dino"
SMALL_HEAD = ["--out-dim", "128", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--num-local-crops", "2",
              "--warmup-epochs", "1", "--log-with", "none"]


def run_stage2(data, output, *flags):
    return main(["--model", "tiny", "--train-data", str(data), "--output-dir", str(output), "--batch-size", "8",
                 *SMALL_HEAD, *flags])


def test_short_run_writes_backbone_into_checkpoint_and_standalone(caption_folder, tmp_path):
    final = run_stage2(caption_folder, tmp_path, "--max-steps", "3", "--epochs", "2")
    rows = [row for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(0 < row["teacher_entropy"] <= torch.log(torch.tensor(128.0)).item() + 1e-4 for row in rows)
    assert rows[0]["teacher_momentum"] == pytest.approx(0.996)
    standalone = AutoModel.from_pretrained(tmp_path / "backbone", add_pooling_layer=False).state_dict()
    inside = AgriCLIPModel.from_pretrained(final).dino_model.state_dict()
    assert standalone.keys() == inside.keys()
    assert all(torch.equal(standalone[k], inside[k]) for k in standalone)
    torch.manual_seed(0)
    initial = AgriCLIPModel(AgriCLIPModel.config_class.tiny()).dino_model.state_dict()
    assert any(not torch.equal(initial[k], inside[k]) for k in inside)


def test_exact_resume(caption_folder, tmp_path):
    flags = ("--max-steps", "4", "--epochs", "2", "--checkpoint-every", "2")
    straight = load_file(run_stage2(caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage2(caption_folder, interrupted, *flags)
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint-4")
    resumed = load_file(run_stage2(caption_folder, interrupted, *flags, "--resume") / "model.safetensors")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_collapse_stops_the_run(caption_folder, tmp_path):
    # A teacher temperature this high flattens every output: uniform collapse within the window.
    with pytest.raises(CollapseError, match="collapse \\(uniform\\)"):
        run_stage2(caption_folder, tmp_path, "--max-steps", "4", "--teacher-temp", "1000", "--warmup-teacher-temp", "1000",
                   "--student-temp", "1000", "--collapse-window", "2")


@pytest.mark.parametrize("corrupt_image", [False, True], ids=["even", "uneven"])
def test_two_processes_match_one_on_the_same_global_batch(corrupt_image, caption_folder, tmp_path):
    """2 CPU processes x 4 images equal 1 process x 8: losses, centre and weights (ViT backbone: no BatchNorm).

    Each process draws the crop parameters of the whole global batch and applies those of its own images, so
    the two runs see identical crops; only the order of floating-point sums differs. With an unreadable image
    the local batches differ in size (3 and 4), and the loss weights each process by its share.
    """
    data = caption_folder
    if corrupt_image:
        data = tmp_path / "data"
        shutil.copytree(caption_folder, data)
        corrupted = data / "train" / "25.png"  # in the first global batch under seed 0, on process 0
        corrupted.write_bytes(corrupted.read_bytes()[:100])
    common = ["training.stage2_dino", "--model", "tiny", "--train-data", str(data), "--max-steps", "2",
              "--epochs", "2", "--checkpoint-every", "2", *SMALL_HEAD]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [row for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 2
    for row_one, row_two in zip(rows["one"], rows["two"]):
        for key in ("loss", "teacher_entropy", "teacher_student_kl", "lr", "weight_decay", "teacher_momentum"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-6), key
    centres = [torch.load(tmp_path / name / "checkpoints" / "checkpoint-2" / "custom_checkpoint_1.pkl",
                          weights_only=True)["center"] for name in ("one", "two")]
    torch.testing.assert_close(centres[1], centres[0], rtol=1e-5, atol=1e-6)
    assert centres[0].abs().sum() > 0
    if corrupt_image:
        assert "truncated (1)" in one.stdout and "truncated (1)" in two.stdout, one.stdout + two.stdout
    weights = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("when", ["before training", "after training"])
def test_sigterm_during_the_k_nn_evaluation_stops_at_once_and_says_what_is_kept(
        when, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback):
    labelled = write_labelled_folder(tmp_path / "labelled", per_class=2)
    evaluate, calls = training.distillation.knn_evaluation, []

    def preempted_while_evaluating(*args, **kwargs):
        calls.append(len(calls))
        if (when == "before training") == (len(calls) == 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training.distillation, "knn_evaluation", preempted_while_evaluating)
    with pytest.raises(SystemExit) as exit_info:
        run_stage2(caption_folder, tmp_path / "run", "--max-steps", "2", "--epochs", "2", "--knn-data", str(labelled))
    assert exit_info.value.code == 143
    kept = ("no checkpoint was written yet: the run starts from the beginning when run again" if when == "before training"
            else f"the newest checkpoint is {tmp_path / 'run' / 'checkpoints' / 'checkpoint-2'}; run the same command "
                 "with --resume to continue")
    assert f"SIGTERM received: stopped; {kept}" in capsys.readouterr().out
    assert not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback
