"""Stage 2: DINO training with Accelerate — exports, exact resume, multi-process parity, collapse guard, k-NN,
preemption."""

import json
import math
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

import training.distillation
from evaluation.knn import knn_accuracy
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from training.distillation import CollapseError, knn_bank_and_queries, starts_random
from training.stage2_dino import RECIPES, build_parser, main, parse_command_line

from conftest import (
    COLOURS,
    SMALL_HEAD,
    STAGE2_ARGS,
    assert_same_tensors,
    kill_before_last_checkpoint,
    read_metrics,
    run_script,
    write_labelled_folder,
)


RUN = "stage2_dino"


def run_stage2(data, output, *flags):
    return main(
        [
            "--model",
            "tiny",
            "--train-data",
            str(data),
            "--output-dir",
            str(output),
            "--batch-size",
            "8",
            *SMALL_HEAD,
            *flags,
        ]
    )


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
    # Without --knn-data the report holds the recipe and where the teacher ended, and no k-NN numbers.
    report = json.loads((final / "stage2_report.json").read_text())
    assert report["recipe"] == "published" and report["steps"] == 3 and report["recipe_settings"]["out_dim"] == 128
    assert report["teacher_entropy"] == rows[-1]["teacher_entropy"]
    assert report["teacher_student_kl"] == rows[-1]["teacher_student_kl"]
    assert report["ln_out_dim"] == pytest.approx(math.log(128))
    assert report["knn_top1_trained"] is report["knn_top1_untrained"] is report["knn_top1_start"] is None


def test_exact_resume(caption_folder, tmp_path):
    flags = ("--max-steps", "4", "--epochs", "2", "--checkpoint-every", "2")
    straight = load_file(run_stage2(caption_folder, tmp_path / "straight", *flags) / "model.safetensors")
    interrupted = tmp_path / "interrupted"
    run_stage2(caption_folder, interrupted, *flags)
    kill_before_last_checkpoint(interrupted, 4)
    resumed = load_file(run_stage2(caption_folder, interrupted, *flags, "--resume") / "model.safetensors")
    assert_same_tensors(straight, resumed)


def test_collapse_stops_the_run(caption_folder, tmp_path):
    # A teacher temperature this high flattens every output: uniform collapse within the window.
    with pytest.raises(CollapseError, match="collapse \\(uniform\\)"):
        run_stage2(
            caption_folder,
            tmp_path,
            "--max-steps",
            "4",
            "--teacher-temp",
            "1000",
            "--warmup-teacher-temp",
            "1000",
            "--student-temp",
            "1000",
            "--collapse-window",
            "2",
        )


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
    common = [*STAGE2_ARGS, "--train-data", str(data)]
    two = run_script([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], processes=2)
    assert "4 x 2 process(es)" in two.stdout, two.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [row for row in read_metrics(tmp_path / name, RUN) if "loss" in row] for name in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 2
    for row_one, row_two in zip(rows["one"], rows["two"]):
        for key in ("loss", "teacher_entropy", "teacher_student_kl", "lr", "weight_decay", "teacher_momentum"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-6), key
    centres = [
        torch.load(tmp_path / name / "checkpoints" / "checkpoint-2" / "custom_checkpoint_1.pkl", weights_only=True)[
            "center"
        ]
        for name in ("one", "two")
    ]
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
    when, caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
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
    kept = (
        "no checkpoint was written yet: the run starts from the beginning when run again"
        if when == "before training"
        else f"the newest checkpoint is {tmp_path / 'run' / 'checkpoints' / 'checkpoint-2'}; run the same command "
        "with --resume to continue"
    )
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
    with pytest.raises(
        ValueError,
        match=r"knn: the k-NN bank \(split 'train'\) has classes \['blue', 'green', 'red', "
        r"'yellow'\] but the queries \(split 'test'\) have \['blue', 'green', 'yellow'\]",
    ):
        knn_bank_and_queries(knn, "train", "test", seed=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--knn-bank-split", "train", "--knn-data", "knn"], "--knn-bank-split and --knn-query-split go together"),
        (["--knn-query-split", "test", "--knn-data", "knn"], "--knn-bank-split and --knn-query-split go together"),
        (["--knn-bank-split", "train", "--knn-query-split", "test"], "name splits of --knn-data: give --knn-data"),
    ],
)
def test_k_nn_splits_go_together_and_with_knn_data(flags, message, caption_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training.distillation, "run", lambda *args: pytest.fail("stage 2 started"))
    with pytest.raises(SystemExit) as exit_info:
        run_stage2(caption_folder, tmp_path, *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_stage2_trains_on_images_without_captions_and_k_nn_splits_it_is_given(caption_folder, tmp_path, monkeypatch):
    """Stage 2 needs no captions (metadata without a caption column), and the k-NN evaluation votes the test split's
    8 images by the train split's 12, before and after training."""
    data = tmp_path / "data"
    shutil.copytree(caption_folder, data)
    for metadata in data.glob("*/metadata.jsonl"):
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        metadata.write_text("".join(json.dumps({"file_name": row["file_name"]}) + "\n" for row in rows))
    write_labelled_folder(tmp_path / "knn" / "train", per_class=3)
    write_labelled_folder(tmp_path / "knn" / "test", per_class=2, seed=1)
    vote, sizes = training.distillation.knn_accuracy, []

    def counted_vote(bank_x, bank_y, query_x, query_y, *args, **kwargs):
        sizes.append((len(bank_x), len(query_x)))
        return vote(bank_x, bank_y, query_x, query_y, *args, **kwargs)

    monkeypatch.setattr(training.distillation, "knn_accuracy", counted_vote)
    run_stage2(
        data,
        tmp_path / "run",
        "--max-steps",
        "1",
        "--knn-data",
        str(tmp_path / "knn"),
        "--knn-bank-split",
        "train",
        "--knn-query-split",
        "test",
    )
    assert sizes == [(12, 8), (12, 8)]
    assert [row["knn_top1"] for row in read_metrics(tmp_path / "run", RUN) if "knn_top1" in row]


def _cosine(start, end, j, n):
    """Step j of a cosine over n steps from `start` to `end`, written out."""
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * j / n))


def test_every_schedule_spans_max_steps_beyond_the_epochs(caption_folder, tmp_path, capsys):
    """--max-steps 6 over --epochs 1 of 4 steps: the run goes on into a second epoch, and the learning rate (warmed
    up over 2 steps from the first), weight decay, teacher momentum and teacher temperature (1 epoch = 4 steps of
    warm-up) follow their formulas over those 6 steps."""
    run_stage2(
        caption_folder,
        tmp_path,
        "--epochs",
        "1",
        "--max-steps",
        "6",
        "--warmup-steps",
        "2",
        "--learning-rate",
        "5e-4",
        "--min-learning-rate",
        "1e-6",
        "--warmup-teacher-temp",
        "0.02",
        "--teacher-temp",
        "0.04",
        "--warmup-teacher-temp-epochs",
        "1",
    )
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
    assert (
        f"peak learning rate {peak:.4g} = 0.0005 per 256 images x 8 images / 256, after 2 warm-up steps"
        in capsys.readouterr().out
    )


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
        run_stage2(
            caption_folder,
            tmp_path,
            "--max-steps",
            "4",
            "--teacher-temp",
            "1000",
            "--warmup-teacher-temp",
            "1000",
            "--student-temp",
            "1000",
            "--collapse-window",
            "2",
        )
    message = str(error.value)
    assert "Stopped at step 2 of 4" in message and "--collapse-window (now 2 steps)" in message
    for flag in ("--teacher-temp", "--center-momentum", "--momentum-teacher", "--learning-rate", "--out-dim"):
        assert flag in message


REQUIRED = ["--model", "m", "--train-data", "d", "--output-dir", "o"]
# DINO's published ViT settings (Caron et al. 2021, main_dino.py defaults for ViT-S/16), which stage 2 always defaulted
# to; a learning rate of None is the optimizer's own (AdamW 5e-4, SGD 0.03).
PUBLISHED = {
    "out_dim": 65536,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "num_local_crops": 8,
    "student_temp": 0.1,
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0,
    "center_momentum": 0.9,
    "momentum_teacher": 0.996,
    "freeze_last_layer_epochs": 1,
    "learning_rate": None,
    "warmup_epochs": 10,
}
# The settings the README demo trained with before there were recipes (training/configs/demo.yaml, stage2).
SMALL_DATA = {
    **PUBLISHED,
    "out_dim": 1024,
    "head_hidden_dim": 256,
    "head_bottleneck_dim": 64,
    "num_local_crops": 4,
    "momentum_teacher": 0.99,
    "learning_rate": 0.002,
    "warmup_epochs": 1,
}


def _settings(args):
    return {name: getattr(args, name) for name in PUBLISHED}


def test_the_recipes_fill_in_what_no_flag_gives():
    assert sorted(RECIPES) == ["published", "small-data"]
    assert _settings(parse_command_line(REQUIRED)) == PUBLISHED and parse_command_line(REQUIRED).recipe == "published"
    assert _settings(parse_command_line([*REQUIRED, "--recipe", "published"])) == PUBLISHED
    assert _settings(parse_command_line([*REQUIRED, "--recipe", "small-data"])) == SMALL_DATA
    given = parse_command_line(
        [*REQUIRED, "--recipe", "small-data", "--out-dim", "4096", "--warmup-epochs", "0", "--learning-rate", "0.01"]
    )
    assert _settings(given) == {**SMALL_DATA, "out_dim": 4096, "warmup_epochs": 0, "learning_rate": 0.01}
    assert _settings(parse_command_line([*REQUIRED, "--momentum-teacher", "0.9"])) == {
        **PUBLISHED,
        "momentum_teacher": 0.9,
    }


def test_a_config_file_gives_the_recipe_and_overrides_its_settings(tmp_path):
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"recipe": "small-data", "out_dim": 512}))
    assert _settings(parse_command_line([*REQUIRED, "--config", str(config)])) == {**SMALL_DATA, "out_dim": 512}
    assert _settings(parse_command_line([*REQUIRED, "--config", str(config), "--out-dim", "256"]))["out_dim"] == 256


def test_the_demo_config_trains_with_the_small_data_settings_at_the_resnet_sgd_rate():
    demo = yaml.safe_load((Path(__file__).parents[1] / "training" / "configs" / "demo.yaml").read_text())["stage2"]
    assert demo["recipe"] == "small-data"
    args = parse_command_line([*REQUIRED, *[f"--{key.replace('_', '-')}={value}" for key, value in demo.items()]])
    # The demo's backbone is a ResNet, trained with SGD: DINO's ResNet-50 rate, 0.03 per 256 images.
    assert _settings(args) == {**SMALL_DATA, "learning_rate": 0.03}


def test_the_help_shows_each_recipe_s_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    shown = {action.dest: formatter._get_help_string(action) for action in parser._actions}
    assert shown["recipe"].endswith("(default: published).")
    for name, defaults in [
        ("out_dim", "published 65536, small-data 1024"),
        ("momentum_teacher", "published 0.996, small-data 0.99"),
        ("num_local_crops", "published 8, small-data 4"),
        ("learning_rate", "published by optimizer (adamw 5e-4, sgd 0.03), small-data 0.002"),
        ("teacher_temp", "published 0.04, small-data 0.04"),
    ]:
        assert f"default: from --recipe: {defaults})" in shown[name], name
    for name in PUBLISHED:
        assert "default: from --recipe: published " in shown[name], name
    assert "--recipe {published,small-data}" in parser.format_help()


@pytest.mark.parametrize(
    ("options", "random"),
    [
        ({"model": "tiny"}, True),
        ({"model": "overrides.json"}, True),
        ({"model": "runs/stage1/final"}, False),
        ({"model": "runs/stage1/final", "random_init": True}, True),
        ({"model": "tiny", "backbone": "facebook/dino-vits16"}, False),
        ({"model": "tiny", "backbone": "facebook/dino-vits16", "random_init": True}, False),  # the weights load over it
    ],
)
def test_the_start_is_random_for_a_preset_or_random_init_without_backbone_weights(options, random):
    assert starts_random(SimpleNamespace(**{"backbone": None, "random_init": False, **options})) is random


def _recorded_knn_evaluations(monkeypatch):
    """The backbone weights each k-NN evaluation of stage 2 sees, in order."""
    evaluate, seen = training.distillation.knn_evaluation, []

    def recorded(backbone, *args, **kwargs):
        seen.append({name: tensor.detach().clone() for name, tensor in backbone.state_dict().items()})
        return evaluate(backbone, *args, **kwargs)

    monkeypatch.setattr(training.distillation, "knn_evaluation", recorded)
    return seen


def _knn_folders(root):
    write_labelled_folder(root / "train", per_class=3)
    write_labelled_folder(root / "test", per_class=2, seed=1)
    return ["--knn-data", str(root), "--knn-bank-split", "train", "--knn-query-split", "test"]


def _features(backbone, folder, checkpoint):
    """CLS features and labels of an image folder of class folders, fed as inference feeds the backbone: the
    checkpoint's processor (as zero-shot and stage 3 use it), its normalisation undone and the backbone's applied."""
    config = AgriCLIPConfig.from_pretrained(checkpoint)
    processor = AgriCLIPProcessor.from_pretrained(checkpoint)
    mean, std, dino_mean, dino_std = (
        torch.tensor(values).view(1, 3, 1, 1)
        for values in (config.image_mean, config.image_std, config.dino_image_mean, config.dino_image_std)
    )
    classes = sorted(path.name for path in folder.iterdir())
    paths = sorted(folder.rglob("*.png"))
    pixels = processor(images=[Image.open(path).convert("RGB") for path in paths], return_tensors="pt")["pixel_values"]
    pixels = pixels * std + mean
    with torch.no_grad():
        features = backbone.eval()(pixel_values=(pixels - dino_mean) / dino_std).last_hidden_state[:, 0]
    return features, torch.tensor([classes.index(path.parent.name) for path in paths])


def test_the_untrained_control_is_a_fresh_seeded_backbone_of_the_same_architecture(
    tiny_checkpoint, caption_folder, tmp_path, monkeypatch, capsys
):
    """From a checkpoint (not a random start), the control is a newly drawn random backbone of the config's
    architecture under --seed: neither the start's weights nor the trained ones, and its k-NN top-1 is that of the
    backbone built and evaluated here."""
    seen = _recorded_knn_evaluations(monkeypatch)
    final = run_stage2(
        caption_folder,
        tmp_path / "run",
        "--model",
        str(tiny_checkpoint),
        "--max-steps",
        "2",
        "--seed",
        "3",
        *_knn_folders(tmp_path / "knn"),
    )
    start, trained, untrained = seen  # step 0, the trained teacher, the control
    config = AgriCLIPConfig.from_pretrained(tiny_checkpoint)
    torch.manual_seed(3)
    fresh = AutoModel.from_config(config.dino_config, add_pooling_layer=False)
    assert untrained.keys() == fresh.state_dict().keys()
    assert all(torch.equal(untrained[name], tensor) for name, tensor in fresh.state_dict().items())
    weights = [name for name in untrained if untrained[name].is_floating_point() and untrained[name].std() > 0]
    assert weights and not any(torch.equal(untrained[name], start[name]) for name in weights)
    assert not any(torch.equal(untrained[name], trained[name]) for name in weights)

    bank, queries = (_features(fresh, tmp_path / "knn" / split, tiny_checkpoint) for split in ("train", "test"))
    expected = knn_accuracy(*bank, *queries, num_classes=len(COLOURS), k=20)
    report = json.loads((final / "stage2_report.json").read_text())
    rows = read_metrics(tmp_path / "run", RUN)
    knn = [row["knn_top1"] for row in rows if "knn_top1" in row]
    losses = [row for row in rows if "loss" in row]
    assert report["knn_top1_untrained"] == pytest.approx(expected, abs=1e-6)
    assert [row["knn_top1_untrained"] for row in rows if "knn_top1_untrained" in row] == [report["knn_top1_untrained"]]
    assert (report["knn_top1_start"], report["knn_top1_trained"]) == tuple(knn)
    assert report["start_random"] is False and report["untrained_control"] == "a fresh random initialisation (seed 3)"
    assert report["recipe"] == "published" and report["overridden"]["out_dim"] == 128
    assert report["teacher_entropy"] == losses[-1]["teacher_entropy"]
    assert report["teacher_student_kl"] == losses[-1]["teacher_student_kl"]
    assert report["ln_out_dim"] == pytest.approx(math.log(128))
    trained_knn, control = report["knn_top1_trained"], report["knn_top1_untrained"]
    assert (
        f"stage 2 (recipe published): k-NN top-1 (knn): trained {trained_knn:.3f}, start {knn[0]:.3f}, untrained "
        f"control {control:.3f} ({trained_knn - control:+.3f}); teacher entropy "
        f"{report['teacher_entropy']:.2f} of ln K = {math.log(128):.2f} at the end, KL "
        f"{report['teacher_student_kl']:.2f}"
    ) in capsys.readouterr().out


def test_a_random_start_is_its_own_untrained_control(caption_folder, tmp_path, monkeypatch, capsys):
    seen = _recorded_knn_evaluations(monkeypatch)
    final = run_stage2(
        caption_folder,
        tmp_path / "run",
        "--max-steps",
        "1",
        "--recipe",
        "small-data",
        "--photometric",
        "colour",
        *_knn_folders(tmp_path / "knn"),
    )
    assert len(seen) == 2  # the start and the trained teacher: the control is not evaluated again
    report = json.loads((final / "stage2_report.json").read_text())
    start = [row["knn_top1"] for row in read_metrics(tmp_path / "run", RUN) if row["step"] == 0]
    assert report["start_random"] is True and report["untrained_control"] == "the random start (step 0)"
    assert [report["knn_top1_untrained"]] == [report["knn_top1_start"]] == start
    assert report["recipe"] == "small-data" and report["recipe_settings"]["momentum_teacher"] == 0.99
    assert report["photometric"] == "colour"
    out = capsys.readouterr().out
    assert "; the random start)" in out
    assert "stage 2: recipe small-data: out_dim 128, head_hidden_dim 32" in out and "momentum_teacher 0.99" in out
    assert "given instead of the recipe's: head_bottleneck_dim, head_hidden_dim, num_local_crops, out_dim" in out


def _step_rows(run_dir):
    return [row for row in read_metrics(run_dir, RUN) if "loss" in row]


def test_koleo_adds_its_weighted_term_to_the_loss_and_the_report_records_the_weight(
    caption_folder, tmp_path, monkeypatch, capsys
):
    """--koleo-weight 0.1 logs a finite KoLeo term per step and adds 0.1 x it to the loss: at step 1 (same weights,
    same crops) the loss is the DINO loss of a run without the term plus 0.1 x koleo. At weight 0 (the default) the
    KoLeo loss never runs and the loss is DINO's, bit for bit."""
    with_koleo = run_stage2(caption_folder, tmp_path / "koleo", "--max-steps", "2", "--koleo-weight", "0.1")
    assert "; KoLeo weight 0.1\n" in capsys.readouterr().out
    koleo_rows = _step_rows(tmp_path / "koleo")
    assert [row["step"] for row in koleo_rows] == [1, 2]
    # Two global crops of 8 images: each term lies between -log 2 (neighbours antipodal) and that of a collapsed crop.
    assert all(math.isfinite(row["koleo"]) and -2 * math.log(2) <= row["koleo"] < 2 * 18 for row in koleo_rows)
    report = json.loads((with_koleo / "stage2_report.json").read_text())
    assert report["koleo_weight"] == 0.1

    def never(*args):
        raise AssertionError("KoLeo computed at weight 0")

    monkeypatch.setattr(training.distillation.KoLeoLoss, "forward", never)
    without = run_stage2(caption_folder, tmp_path / "none", "--max-steps", "2")
    assert "; KoLeo weight 0 (off: the published DINO)" in capsys.readouterr().out
    rows = _step_rows(tmp_path / "none")
    assert all("koleo" not in row for row in rows)
    assert json.loads((without / "stage2_report.json").read_text())["koleo_weight"] == 0.0
    assert koleo_rows[0]["teacher_entropy"] == rows[0]["teacher_entropy"]
    assert koleo_rows[0]["loss"] == pytest.approx(rows[0]["loss"] + 0.1 * koleo_rows[0]["koleo"], rel=1e-6)
    assert koleo_rows[1]["loss"] != rows[1]["loss"]  # the term trained the student

    run_stage2(caption_folder, tmp_path / "zero", "--max-steps", "2", "--koleo-weight", "0")
    assert [row["loss"] for row in _step_rows(tmp_path / "zero")] == [row["loss"] for row in rows]


def test_a_checkpoint_from_before_koleo_resumes_at_weight_0_only():
    """A checkpoint that records no koleo_weight (written before the option) stands for weight 0: resuming it at 0
    compares equal, at any other weight the difference is refused as for any option."""
    from training.distillation import checkpoint_options
    from training.runtime import option_changes

    accelerator = SimpleNamespace(num_processes=1, mixed_precision="no")
    default, weighted = (
        checkpoint_options(parse_command_line([*REQUIRED, *flags]), accelerator)
        for flags in ([], ["--koleo-weight", "0.1"])
    )
    assert "koleo_weight" not in default and weighted["koleo_weight"] == 0.1
    before_koleo = dict(default)
    assert option_changes(before_koleo, default) == []
    assert option_changes(before_koleo, weighted) == ["--koleo-weight: (none) -> 0.1"]
    assert option_changes(weighted, default) == ["--koleo-weight: 0.1 -> (none)"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--koleo-weight", "-0.1"], "--koleo-weight must be a finite number of at least 0, got -0.1"),
        (["--koleo-weight", "nan"], "--koleo-weight must be a finite number of at least 0, got nan"),
        (["--koleo-weight", "0.1", "--batch-size", "1"], "--koleo-weight needs --batch-size of at least 2"),
    ],
)
def test_bad_koleo_settings_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line([*REQUIRED, *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_koleo_weight_is_a_dino_loss_option_off_by_default():
    parser = build_parser()
    group = next(group for group in parser._action_groups if group.title == "DINO head and loss")
    action = next(action for action in group._group_actions if action.dest == "koleo_weight")
    assert action.default == 0.0 and parse_command_line(REQUIRED).koleo_weight == 0.0
    assert "published DINO" in action.help and "DINOv2 uses 0.1" in action.help
