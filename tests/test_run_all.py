"""The end-to-end run: three stages into one Hub-ready folder, evaluated, carded; skips finished stages."""

import json

import yaml
from huggingface_hub import ModelCard

from training.run_all import as_flags, main

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


def test_run_all_builds_a_hub_ready_checkpoint_and_skips_finished_stages(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "output_dir": str(tmp_path / "run")}))
    checkpoint = main(["--config", str(config)])
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "modeling_agriclip.py",
            "README.md", "eval_results.json"} <= files
    results = json.loads((checkpoint / "eval_results.json").read_text())
    assert set(results["mean"]) == {"agriclip (aligned)", "agriclip (clip)"}
    card = ModelCard.load(checkpoint / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification"
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
    main(["--config", str(config)])
    printed = capsys.readouterr().out
    assert printed.count("done already") == 3
    assert (checkpoint / "model.safetensors").read_bytes() == before
