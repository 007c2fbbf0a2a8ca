"""The end-to-end run: three stages into one Hub-ready folder, evaluated beside the equal-compute CLIP control,
carded; skips finished stages; stops promptly and truthfully on SIGTERM."""

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import evaluation.runner
import training.run_all
from evaluation.metrics import METRIC_KEYS
from training.run_all import control_options, describe_control, main, run_stages
from training.runtime import CheckpointManager, RunLock


# Budgets in epochs, so that the control's step count follows from the data size: a batch of 64 leaves few steps.
TINY_RUN = {
    "model": "tiny",
    "data": {"embedded": {"seed": 0, "pretrain_per_class": 4, "downstream_per_task": 12}},
    "evaluation": {"embeddings": ["aligned", "clip"], "batch_size": 32},
    "stage1": {"epochs": 1, "batch_size": 64, "seed": 3},
    "stage2": {
        "epochs": 1,
        "batch_size": 64,
        "num_local_crops": 2,
        "out_dim": 64,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "warmup_epochs": 0,
    },
    "stage3": {"batch_size": 32, "ridge": 0.01},
    "control": {},
}


def test_the_control_trains_stage_1_for_the_stage_1_plus_stage_2_budget():
    stage1 = {"epochs": 10, "batch_size": 64, "learning_rate": 0.002, "seed": 7}
    config = {"model": "tiny", "stage1": stage1, "stage2": {"epochs": 8, "batch_size": 32, "out_dim": 1024}}
    assert control_options(config) is None  # no control section, no control
    # Stage 1's own options (not stage 2's), with the epochs summed.
    assert control_options({**config, "control": {}}) == {**stage1, "epochs": 18}
    assert control_options({**config, "control": None}) == {**stage1, "epochs": 18}  # `control:` left empty in YAML
    # max_steps replaces epochs: both sections in steps sum their steps, whatever epochs they also name.
    steps = {
        "stage1": {"max_steps": 4, "epochs": 3, "batch_size": 32},
        "stage2": {"max_steps": 5, "epochs": 2},
        "control": {},
    }
    assert control_options(steps) == {"max_steps": 9, "batch_size": 32}
    # The section's options override; a budget of its own replaces the sum, and stage 1's steps would override it.
    assert control_options({**config, "control": {"epochs": 30, "learning_rate": 0.001}}) == {
        **stage1,
        "epochs": 30,
        "learning_rate": 0.001,
    }
    assert control_options({**steps, "control": {"epochs": 30}}) == {"epochs": 30, "batch_size": 32}
    assert control_options({**steps, "control": {"batch_size": 8}}) == {"max_steps": 9, "batch_size": 8}
    mixed = {"stage1": {"epochs": 10}, "stage2": {"max_steps": 40}, "control": {}}
    with pytest.raises(ValueError, match=r"stage1\.epochs, stage2\.max_steps\); or give the control section"):
        control_options(mixed)
    with pytest.raises(ValueError, match=r"\(stage1\.epochs, stage2 sets neither\)"):
        control_options({"stage1": {"epochs": 10}, "stage2": {"batch_size": 8}, "control": {}})
    with pytest.raises(ValueError, match=r"\(stage1 sets neither, stage2 sets neither\)"):
        control_options({"control": {}})
    assert control_options({**mixed, "control": {"max_steps": 50}}) == {"max_steps": 50}  # no sum needed


def test_the_card_note_states_the_budgets_the_logs_record(tmp_path):
    """The note reads the control's length from its own log: a control section may have set a budget of its own."""
    logs = tmp_path / "control" / "logs" / "stage1_contrastive"
    logs.mkdir(parents=True)
    (logs / "config.json").write_text(json.dumps({"model": "tiny", "epochs": 1, "max_steps": 30}))
    stages = {"stage1_contrastive": {"epochs": 10}, "stage2_dino": {"epochs": 1, "max_steps": 1}}
    assert describe_control(tmp_path, stages) == (
        "the equal-compute CLIP control: stage 1 alone, from the same start, for 30 optimizer steps, against this "
        "checkpoint's stage 1 of 10 epochs and stage 2 of 1 optimizer step"
    )


@pytest.mark.slow
def test_run_all_builds_a_hub_ready_checkpoint_and_skips_finished_stages(tmp_path, capsys, monkeypatch):
    # Relative paths, as a user in their project folder writes them (the README demo's output_dir is relative).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**TINY_RUN, "output_dir": "run"}))
    checkpoint = main(["--config", "run.yaml"])
    files = {p.name for p in checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "modeling_agriclip.py",
        "README.md",
        "eval_results.json",
    } <= files
    results = json.loads((checkpoint / "eval_results.json").read_text())
    assert set(results["mean"]) == {"agriclip (aligned)", "agriclip (clip)", "clip-control (clip)"}
    control = tmp_path / "run" / "control"
    assert Path(results["models"]["clip-control (clip)"]["path"]).resolve() == control / "final"
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    # Named after the run, never after the staging folder the card was written in.
    assert card.data.model_name == "run" and card.text.lstrip().startswith("# run")
    assert "staging" not in (checkpoint / "README.md").read_text()
    # The card's model-index covers the checkpoint's own embedding ("aligned"): every metric the suite computed.
    reported = [(row["agriclip (aligned)"], metric) for row in results["datasets"].values() for metric in METRIC_KEYS]
    assert sorted(r.metric_value for r in card.data.eval_results) == sorted(
        scores[metric] for scores, metric in reported if scores[metric] is not None
    )
    printed = capsys.readouterr().out
    assert "| agriclip (aligned) |" in printed and "classified" in printed
    for stage in ("stage1", "stage2", "stage3"):
        assert (tmp_path / "run" / stage / "final" / "model.safetensors").is_file()

    # The control: stage 1 from the run's own start and seed, for stage 1's epoch plus stage 2's, which on the
    # training split (drop_last batches) are 2 x (pairs // batch size) optimizer steps.
    pairs = len((tmp_path / "run" / "data" / "pretrain" / "train" / "metadata.jsonl").read_text().splitlines())
    expected_steps = 2 * (pairs // TINY_RUN["stage1"]["batch_size"])
    flags = json.loads((control / "logs" / "stage1_contrastive" / "config.json").read_text())
    assert (flags["model"], flags["seed"], flags["epochs"], flags["batch_size"]) == ("tiny", 3, 2, 64)
    rows = [
        json.loads(line)
        for line in (control / "logs" / "stage1_contrastive" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, expected_steps + 1))
    assert (control / "checkpoints" / f"checkpoint-{expected_steps}").is_dir()
    assert "control (stage 1 for the stage-1 + stage-2 budget): " in printed and "| clip-control (clip) |" in printed
    # The control is a row of the report and of the card, said to be the control; the model-index (above) is the
    # checkpoint's own entry alone, and the Chance row still closes the tables.
    assert "| clip-control (clip) |" in (tmp_path / "run" / "evaluation" / "results.md").read_text()
    text = (checkpoint / "README.md").read_text()
    assert "| clip-control (clip) |" in text and "| Chance |" in text
    assert (
        "**clip-control (clip)** is the equal-compute CLIP control: stage 1 alone, from the same start, for 2 "
        "epochs, against this checkpoint's stage 1 of 1 epoch and stage 2 of 1 epoch. clip-control (clip): mean "
        f"top-1 accuracy {100 * results['mean']['clip-control (clip)']['top1']:.1f} %"
    ) in text

    before = (checkpoint / "model.safetensors").read_bytes()
    main(["--config", "run.yaml"])
    printed = capsys.readouterr().out
    assert printed.count("done already") == 4 and "control: done already (run/control/final)" in printed
    assert (checkpoint / "model.safetensors").read_bytes() == before


def test_a_stage_stopped_under_run_all_says_to_run_the_same_command_again(
    caption_folder, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    """run_all resumes by itself (it has no --resume flag): a stage's SIGTERM message must not ask for one."""
    save = CheckpointManager.save

    def save_then_preempt(self, position):
        saved = save(self, position)
        if position.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(CheckpointManager, "save", save_then_preempt)
    config = {"model": "tiny", "stage1": {"max_steps": 3, "batch_size": 8, "checkpoint_every": 1, "log_with": "none"}}
    with pytest.raises(SystemExit) as exit_info:
        run_stages(config, {"train_data": str(caption_folder)}, tmp_path)
    assert exit_info.value.code == 143
    printed = capsys.readouterr().out
    assert (
        f"SIGTERM received: checkpoint of step 2 written to {tmp_path / 'stage1' / 'checkpoints' / 'checkpoint-2'}; "
        "run the same command again to continue (finished stages are skipped, an interrupted one resumes)"
    ) in printed
    assert "--resume" not in printed


def test_sigterm_during_the_evaluation_stops_at_once_and_says_what_is_kept(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, sigterm_fallback
):
    """After the stages, the handler the stages installed is gone; the evaluation is stopped by run_all's own."""
    output = tmp_path / "run"

    def stages_done(config, data, output_dir):
        for name in ("stage1", "stage2", "stage3"):
            (output_dir / name / "final").mkdir(parents=True)
        return tiny_checkpoint

    def preempted_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # an evaluation that would run on

    monkeypatch.setattr(
        training.run_all, "prepare_data", lambda config, output_dir: {"train_data": "unused", "suite": "x"}
    )
    monkeypatch.setattr(training.run_all, "run_stages", stages_done)
    monkeypatch.setattr(evaluation.runner, "run_suite", preempted_while_evaluating)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output)}))
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 143 and time.monotonic() - started < 30
    assert (
        f"SIGTERM received: stopped; the stages finished so far (stage1, stage2, stage3) are in {output}; run the "
        "same command again to continue"
    ) in capsys.readouterr().out
    assert not (output / "agriclip").exists() and not (output / RunLock.NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


@pytest.mark.parametrize("name", sorted(training.run_all.CONFIGS))
def test_packaged_configs_hold_only_flags_of_their_stage_scripts(name):
    """Every key of a stage section is a flag of that stage's script: a renamed flag cannot break the demo or the
    smoke run silently."""
    config = yaml.safe_load(training.run_all.CONFIGS[name].read_text())
    for stage, (options, _) in training.run_all.STAGES.items():
        known = {field.name for field in dataclasses.fields(options)}
        assert set(config.get(stage) or {}) <= known, (stage, sorted(set(config[stage]) - known))
    # The control is stage 1: its section, and the options derived for it, are stage 1's options.
    known = {field.name for field in dataclasses.fields(training.stage1_contrastive.ContrastiveOptions)}
    assert set(control_options(config)) <= known


def test_the_card_of_a_run_says_where_its_weights_started_and_that_its_data_is_synthetic(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """run_all gives the card the start its stage logs record and prepare_data's synthetic marker; a config that
    trains on data of its own is not called synthetic."""

    def stages_done(config, data, output_dir):
        # The flags stage 1 logs (the `model` run_stages passes it), without training; and a control's log of the
        # same run name, which is no part of the checkpoint's training.
        for folder, model in (("stage1", config["model"]), ("control", "openai/clip-vit-base-patch16")):
            logs = output_dir / folder / "logs" / "stage1_contrastive"
            logs.mkdir(parents=True)
            (logs / "config.json").write_text(json.dumps({"model": model, "train_data": data["train_data"]}))
        return tiny_checkpoint

    monkeypatch.setattr(training.run_all, "run_stages", stages_done)
    embedded = {"seed": 0, "image_size": 32, "pretrain_per_class": 1, "downstream_per_task": 12, "num_workers": 1}
    config = {"model": "tiny", "data": {"embedded": embedded}, "evaluation": {"embeddings": ["aligned"]}}
    checkpoint = training.run_all.run(config, tmp_path / "run")
    opening = (checkpoint / "README.md").read_text().split("## Model description")[0]
    assert "started from random weights (the `tiny` preset)" in opening
    assert "**ALive-mini (embedded)**, a synthetic dataset of procedurally drawn images" in opening
    assert "| Chance |" in (checkpoint / "README.md").read_text()
    own_data = {"data": {"embedded": embedded, "train_data": str(tmp_path / "photos")}}
    assert training.run_all.prepare_data(config, tmp_path / "run")["synthetic"] is True
    assert training.run_all.prepare_data(own_data, tmp_path / "run")["synthetic"] is False
