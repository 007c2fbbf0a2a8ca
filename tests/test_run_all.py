"""The end-to-end run: three stages into one Hub-ready folder, evaluated, carded; skips finished stages; stops
promptly and truthfully on SIGTERM."""

import json
import os
import signal
import time

import pytest
import yaml
from huggingface_hub import ModelCard

import evaluation.runner
import training.run_all
from training.runtime import CheckpointManager, RunLock
from training.run_all import as_flags, main, run_stages

TINY_RUN = {
    "model": "tiny",
    "data": {"embedded": {"seed": 0, "pretrain_per_class": 4, "downstream_per_task": 12}},
    "evaluation": {"embeddings": ["aligned", "clip"], "batch_size": 32},
    "stage1": {"max_steps": 2, "batch_size": 16},
    "stage2": {"max_steps": 2, "epochs": 2, "batch_size": 16, "num_local_crops": 2, "out_dim": 64,
               "head_hidden_dim": 32, "head_bottleneck_dim": 16, "warmup_epochs": 1},
    "stage3": {"batch_size": 32, "ridge": 0.01},
}


def test_flags_from_config_values():
    assert as_flags({"batch_size": 8, "freeze_text": True, "resume": False, "adam_betas": [0.9, 0.98], "x": None}) == [
        "--batch-size", "8", "--freeze-text", "--adam-betas", "0.9", "0.98"]


@pytest.mark.slow
def test_run_all_builds_a_hub_ready_checkpoint_and_skips_finished_stages(tmp_path, capsys, monkeypatch):
    # Relative paths, as a user in their project folder writes them (the README demo's output_dir is relative).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**TINY_RUN, "output_dir": "run"}))
    checkpoint = main(["--config", "run.yaml"])
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "modeling_agriclip.py",
            "README.md", "eval_results.json"} <= files
    results = json.loads((checkpoint / "eval_results.json").read_text())
    assert set(results["mean"]) == {"agriclip (aligned)", "agriclip (clip)"}
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    # Named after the run, never after the staging folder the card was written in.
    assert card.data.model_name == "run" and card.text.lstrip().startswith("# run")
    assert "staging" not in (checkpoint / "README.md").read_text()
    # The card's model-index covers the checkpoint's own embedding ("aligned"): every metric the suite computed.
    reported = [(row["agriclip (aligned)"], metric) for row in results["datasets"].values()
                for metric in ("top1", "top5", "mean_per_class", "macro_f1")]
    assert sorted(r.metric_value for r in card.data.eval_results) == sorted(
        scores[metric] for scores, metric in reported if scores[metric] is not None)
    printed = capsys.readouterr().out
    assert "| agriclip (aligned) |" in printed and "classified" in printed
    for stage in ("stage1", "stage2", "stage3"):
        assert (tmp_path / "run" / stage / "final" / "model.safetensors").is_file()

    before = (checkpoint / "model.safetensors").read_bytes()
    main(["--config", "run.yaml"])
    printed = capsys.readouterr().out
    assert printed.count("done already") == 3
    assert (checkpoint / "model.safetensors").read_bytes() == before


def test_a_stage_stopped_under_run_all_says_to_run_the_same_command_again(caption_folder, tmp_path, monkeypatch, capsys,
                                                                        sigterm_fallback):
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
    assert (f"SIGTERM received: checkpoint of step 2 written to {tmp_path / 'stage1' / 'checkpoints' / 'checkpoint-2'}; "
            "run the same command again to continue (finished stages are skipped, an interrupted one resumes)") in printed
    assert "--resume" not in printed


def test_sigterm_during_the_evaluation_stops_at_once_and_says_what_is_kept(tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                                         sigterm_fallback):
    """After the stages, the handler the stages installed is gone; the evaluation is stopped by run_all's own."""
    output = tmp_path / "run"

    def stages_done(config, data, output_dir):
        for name in ("stage1", "stage2", "stage3"):
            (output_dir / name / "final").mkdir(parents=True)
        return tiny_checkpoint

    def preempted_while_evaluating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # an evaluation that would run on

    monkeypatch.setattr(training.run_all, "prepare_data", lambda config, output_dir: {"train_data": "unused", "suite": "x"})
    monkeypatch.setattr(training.run_all, "run_stages", stages_done)
    monkeypatch.setattr(evaluation.runner, "run_suite", preempted_while_evaluating)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output)}))
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 143 and time.monotonic() - started < 30
    assert (f"SIGTERM received: stopped; the stages finished so far (stage1, stage2, stage3) are in {output}; run the "
            "same command again to continue") in capsys.readouterr().out
    assert not (output / "agriclip").exists() and not (output / RunLock.NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_fallback


@pytest.mark.parametrize("name", sorted(training.run_all.CONFIGS))
def test_packaged_configs_hold_only_flags_of_their_stage_scripts(name):
    """Every key of a stage section is a flag of that stage's script: a renamed flag cannot break the demo or the
    smoke run silently."""
    config = yaml.safe_load(training.run_all.CONFIGS[name].read_text())
    for stage, script in training.run_all.STAGES:
        known = {action.dest for action in script.build_parser()._actions}
        assert set(config.get(stage) or {}) <= known, (stage, sorted(set(config[stage]) - known))
