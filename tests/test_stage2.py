"""Stage 2: DINO training with Accelerate — exports, exact resume, multi-process parity, collapse guard, k-NN,
preemption."""

import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import training.distillation
from conftest import COLOURS, read_metrics, run_script, write_labelled_folder
from modeling_agriclip import AgriCLIPModel
from training.distillation import CollapseError, knn_bank_and_queries
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


@pytest.mark.slow
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


def image_paths(dataset) -> list[str]:
    return [row["image"]["path"] for row in dataset]


def test_k_nn_bank_and_queries_come_from_the_splits_named(tmp_path):
    """DINO's protocol: the train split is the memory bank and the test split the queries; without splits, seeded
    halves of one labelled folder; splits of other classes are refused."""
    knn = tmp_path / "knn"
    write_labelled_folder(knn / "train", per_class=3)
    write_labelled_folder(knn / "test", per_class=2, seed=1)
    bank, queries, classes = knn_bank_and_queries(knn, "train", "test", seed=0)
    assert classes == sorted(COLOURS)
    assert sorted(image_paths(bank)) == sorted(str(path) for path in (knn / "train").rglob("*.png"))
    assert sorted(image_paths(queries)) == sorted(str(path) for path in (knn / "test").rglob("*.png"))
    assert bank["label"].count(classes.index("red")) == 3 and queries["label"].count(classes.index("red")) == 2

    bank, queries, _ = knn_bank_and_queries(knn / "train", None, None, seed=0)
    assert len(bank) == len(queries) == 6 and not set(image_paths(bank)) & set(image_paths(queries))
    assert knn_bank_and_queries(knn / "train", None, None, seed=0)[1]["image"] == queries["image"]  # seeded

    shutil.rmtree(knn / "test" / "red")
    with pytest.raises(ValueError, match=r"knn: the k-NN bank \(split 'train'\) has classes \['blue', 'green', 'red', "
                                         r"'yellow'\] but the queries \(split 'test'\) have \['blue', 'green', 'yellow'\]"):
        knn_bank_and_queries(knn, "train", "test", seed=0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--knn-bank-split", "train", "--knn-data", "knn"], "--knn-bank-split and --knn-query-split go together"),
    (["--knn-query-split", "test", "--knn-data", "knn"], "--knn-bank-split and --knn-query-split go together"),
    (["--knn-bank-split", "train", "--knn-query-split", "test"], "name splits of --knn-data: give --knn-data"),
])
def test_k_nn_splits_go_together_and_with_knn_data(flags, message, caption_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training.distillation, "run", lambda *args: pytest.fail("stage 2 started"))
    with pytest.raises(SystemExit) as exit_info:
        run_stage2(caption_folder, tmp_path, *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_stage2_reads_the_columns_and_k_nn_splits_it_is_given(caption_folder, tmp_path, monkeypatch):
    """--caption-column reaches the training data (a column not named `caption`), and the k-NN evaluation votes the
    test split's 8 images by the train split's 12, before and after training."""
    data = tmp_path / "data"
    shutil.copytree(caption_folder, data)
    for metadata in data.glob("*/metadata.jsonl"):
        metadata.write_text(metadata.read_text().replace('"caption":', '"description":'))
    write_labelled_folder(tmp_path / "knn" / "train", per_class=3)
    write_labelled_folder(tmp_path / "knn" / "test", per_class=2, seed=1)
    vote, sizes = training.distillation.knn_accuracy, []

    def counted_vote(bank_x, bank_y, query_x, query_y, *args, **kwargs):
        sizes.append((len(bank_x), len(query_x)))
        return vote(bank_x, bank_y, query_x, query_y, *args, **kwargs)

    monkeypatch.setattr(training.distillation, "knn_accuracy", counted_vote)
    run_stage2(data, tmp_path / "run", "--max-steps", "1", "--caption-column", "description", "--knn-data",
               str(tmp_path / "knn"), "--knn-bank-split", "train", "--knn-query-split", "test")
    assert sizes == [(12, 8), (12, 8)]
    assert [row["knn_top1"] for row in read_metrics(tmp_path / "run", RUN) if "knn_top1" in row]


def _cosine(start, end, j, n):
    """Step j of a cosine over n steps from `start` to `end`, written out."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * j / n))


def test_every_schedule_spans_max_steps_beyond_the_epochs(caption_folder, tmp_path, capsys):
    """--max-steps 6 over --epochs 1 of 4 steps: the run goes on into a second epoch, and the learning rate (warmed
    up over 2 steps from the first), weight decay, teacher momentum and teacher temperature (1 epoch = 4 steps of
    warm-up) follow their formulas over those 6 steps."""
    run_stage2(caption_folder, tmp_path, "--epochs", "1", "--max-steps", "6", "--warmup-steps", "2", "--learning-rate",
               "5e-4", "--min-learning-rate", "1e-6", "--warmup-teacher-temp", "0.02", "--teacher-temp", "0.04",
               "--warmup-teacher-temp-epochs", "1")
    rows = [row for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    peak = 5e-4 * 8 / 256  # per 256 images, scaled to the total batch of 8
    expected = {
        "lr": [peak / 2, peak] + [_cosine(peak, 1e-6, j, 4) for j in range(4)],
        "weight_decay": [_cosine(0.04, 0.4, j, 6) for j in range(6)],
        "teacher_momentum": [_cosine(0.996, 1.0, j, 6) for j in range(6)],
        "teacher_temp": [0.02 + 0.02 * (i + 1) / 4 for i in range(4)] + [0.04, 0.04],
    }
    for key, values in expected.items():
        assert [row[key] for row in rows] == pytest.approx(values, rel=1e-9), key
    assert (f"peak learning rate {peak:.4g} = 0.0005 per 256 images x 8 images / 256, after 2 warm-up steps"
            in capsys.readouterr().out)


def test_a_warm_up_in_epochs_ends_by_the_end_of_a_short_run(caption_folder, tmp_path):
    """DINO's 10 warm-up epochs (40 steps here) in a 3-step run: the warm-up stops at the run's end, so the run
    reaches its peak learning rate at its last step."""
    run_stage2(caption_folder, tmp_path, "--max-steps", "3", "--warmup-epochs", "10", "--learning-rate", "5e-4")
    peak = 5e-4 * 8 / 256
    lrs = [row["lr"] for row in read_metrics(tmp_path, RUN) if "loss" in row]
    assert lrs == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-9)


class _Stop(Exception):
    pass


def test_the_default_collapse_window_scales_with_the_run(caption_folder, tmp_path, monkeypatch):
    windows = []

    def recorded(out_dim, window):
        windows.append(window)
        raise _Stop  # the window is known: no need to train 3000 steps

    monkeypatch.setattr(training.distillation, "CollapseMonitor", recorded)
    with pytest.raises(_Stop):
        run_stage2(caption_folder, tmp_path / "long", "--max-steps", "3000", "--warmup-steps", "500")
    with pytest.raises(_Stop):
        run_stage2(caption_folder, tmp_path / "short", "--max-steps", "40")
    assert windows == [500 + 300, 100]


def test_a_collapse_error_names_the_flags_to_change(caption_folder, tmp_path):
    with pytest.raises(CollapseError) as error:
        run_stage2(caption_folder, tmp_path, "--max-steps", "4", "--teacher-temp", "1000", "--warmup-teacher-temp", "1000",
                   "--student-temp", "1000", "--collapse-window", "2")
    message = str(error.value)
    assert "Stopped at step 2 of 4" in message and "--collapse-window (now 2 steps)" in message
    for flag in ("--teacher-temp", "--center-momentum", "--momentum-teacher", "--learning-rate", "--out-dim"):
        assert flag in message
