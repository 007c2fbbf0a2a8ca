"""Sharded training: stage 1 under FSDP2 (`accelerate launch --config_file training/configs/fsdp2.yaml`) on 2 CPU
processes over gloo, against one process on the same global batch; exact resume; the export."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from modeling_agriclip import AgriCLIPModel
from training.sharding import SCALAR_PARAMETERS, full_state_dict, plain_class, prepare_for_sharding

from conftest import (
    STAGE2_ARGS,
    kill_before_last_checkpoint,
    read_metrics,
    run_script,
    run_subprocess,
    write_labelled_folder,
)


RUN = "stage1_contrastive"
FSDP2_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "fsdp2.yaml"


def run_fsdp2(module_args, timeout=300):
    """`python -m <module> ...` under `accelerate launch` with the shipped FSDP2 config, on 2 CPU processes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP2_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        *module_args,
    ]
    return run_subprocess(command, env=env, timeout=timeout)


def test_the_shipped_fsdp2_config_asks_for_fsdp2():
    text = FSDP2_CONFIG.read_text()
    assert "distributed_type: FSDP" in text and "fsdp_version: 2" in text


def test_plain_class_is_the_class_itself_for_an_unsharded_model(tiny_model):
    with plain_class(tiny_model) as model:
        assert type(model) is AgriCLIPModel
    assert all(getattr(tiny_model, name).dim() == 0 for name in SCALAR_PARAMETERS)


def test_without_fsdp_the_sharding_steps_leave_the_model_as_it_is(tiny_config):
    model = AgriCLIPModel(tiny_config)
    accelerator = Accelerator(cpu=True)
    assert prepare_for_sharding(accelerator, model) is model
    assert all(getattr(model, name).dim() == 0 for name in SCALAR_PARAMETERS)
    assert full_state_dict(accelerator, model) is None


def assert_stage1_runs_agree(one: Path, sharded: Path, steps: int) -> tuple[dict, dict]:
    """Two stage-1 runs agree: their logged losses (`steps` of them) and exported weights (1e-5), the sharded export
    with the scalar parameters in their checkpoint shape. Returns the losses by run ("one", "sharded") and the
    sharded run's exported weights."""
    losses = {
        name: [row["loss"] for row in read_metrics(run, RUN) if "loss" in row]
        for name, run in (("one", one), ("sharded", sharded))
    }
    assert len(losses["one"]) == steps
    assert losses["sharded"] == pytest.approx(losses["one"], abs=1e-5)
    weights_one = load_file(one / "final" / "model.safetensors")
    weights_sharded = load_file(sharded / "final" / "model.safetensors")
    assert weights_one.keys() == weights_sharded.keys()
    for key in weights_one:
        assert weights_one[key].shape == weights_sharded[key].shape, key
        torch.testing.assert_close(weights_sharded[key], weights_one[key], atol=1e-5, rtol=1e-4, msg=key)
    assert all(weights_sharded[name].dim() == 0 for name in SCALAR_PARAMETERS)
    return losses, weights_sharded


@pytest.mark.slow
def test_fsdp2_stage1_matches_one_process_resumes_exactly_and_exports_full_weights(caption_folder, tmp_path):
    """FSDP2 on 2 processes x batch 4 equals 1 process x batch 8 in losses and exported weights (1e-5); a run killed
    before its last checkpoint resumes under FSDP2 to the same weights bit for bit; the export holds every tensor of
    the model, the scalar parameters in their checkpoint shape, and loads."""
    common = [
        "training.stage1_contrastive",
        "--model",
        "tiny",
        "--train-data",
        str(caption_folder),
        "--max-steps",
        "5",
        "--checkpoint-every",
        "3",
        "--log-with",
        "none",
        "--learning-rate",
        "1e-3",
    ]
    sharded = run_fsdp2([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "4 x 2 process(es)" in sharded.stdout, sharded.stderr[-3000:]
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir(), "the checkpoint is not FSDP's sharded one"
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]

    losses, weights_fsdp = assert_stage1_runs_agree(tmp_path / "one", tmp_path / "fsdp", steps=5)
    assert (tmp_path / "fsdp" / "final" / "modeling_agriclip.py").is_file()
    assert not list((tmp_path / "fsdp" / "final").glob("_fsdp*.py"))

    loaded, info = AgriCLIPModel.from_pretrained(tmp_path / "fsdp" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(torch.isfinite(value).all() for value in weights_fsdp.values())
    state = loaded.state_dict()  # the backbone's keys are renamed on loading; the CLIP towers' are not
    shared = [key for key in weights_fsdp if key in state]
    assert len(shared) > len(weights_fsdp) // 2 and "logit_scale" in shared
    for key in shared:
        assert torch.equal(state[key], weights_fsdp[key]), key

    kill_before_last_checkpoint(tmp_path / "fsdp", last_step=5)
    resumed = run_fsdp2([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp"), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    rows = [row for row in read_metrics(tmp_path / "fsdp", RUN) if "loss" in row]
    assert [row["loss"] for row in rows[-2:]] == losses["sharded"][-2:]
    final = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert final.keys() == weights_fsdp.keys()
    for key in final:
        assert torch.equal(final[key], weights_fsdp[key]), key
    assert json.loads((tmp_path / "fsdp" / "final" / "config.json").read_text())["model_type"] == "agriclip"


def assert_stage2_runs_agree(one: Path, sharded: Path) -> None:
    """Two stage-2 runs agree: their logged loss, teacher entropy and KL per step, and their exported model and
    backbone (1e-5)."""
    rows = [[row for row in read_metrics(run, "stage2_dino") if "loss" in row] for run in (one, sharded)]
    assert len(rows[0]) == len(rows[1]) == 2
    for row_one, row_sharded in zip(*rows):
        for key in ("loss", "teacher_entropy", "teacher_student_kl"):
            assert row_sharded[key] == pytest.approx(row_one[key], rel=1e-5, abs=1e-6), key
    for folder in ("final", "backbone"):
        weights = [load_file(run / folder / "model.safetensors") for run in (one, sharded)]
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert weights[0][key].shape == weights[1][key].shape, key
            torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp2_stage2_matches_one_process_and_exports_the_teacher(caption_folder, tmp_path):
    """Stage 2 under FSDP2 on 2 processes x batch 4 equals 1 process x batch 8: losses, and the exported model and
    backbone (the EMA teacher, updated from the student's gathered shards)."""
    common = [*STAGE2_ARGS, "--train-data", str(caption_folder)]
    sharded = run_fsdp2([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert (tmp_path / "fsdp" / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    assert_stage2_runs_agree(tmp_path / "one", tmp_path / "fsdp")


def lora_classification_args(tiny_checkpoint, folder):
    """LoRA (classification) of the tiny checkpoint on a labelled folder for two steps, as the sharded runs and their
    one-process references train it."""
    return [
        "training.lora_finetune",
        "--model",
        str(tiny_checkpoint),
        "--train-data",
        str(folder),
        "--templates",
        "a photo of a {} leaf.",
        "--learning-rate",
        "1e-2",
        "--shots",
        "4",  # 16 images: two whole global batches of 8
        "--max-steps",
        "2",
        "--log-with",
        "none",
    ]


def assert_adapters_agree(one: Path, sharded: Path, name: str) -> dict:
    """Two LoRA runs saved the same adapter weights (1e-5); returns their results.json by run ("one", `name`)."""
    weights = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, sharded)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-4, msg=key)
    return {
        run_name: json.loads((run / "results.json").read_text()) for run_name, run in (("one", one), (name, sharded))
    }


@pytest.mark.slow
def test_fsdp2_lora_matches_one_process(tiny_checkpoint, tmp_path):
    """LoRA (classification) under FSDP2 on 2 processes x batch 4 equals 1 process x batch 8: the adapter weights and
    the held-out top-1 (evaluated with the root's parameters gathered)."""
    common = lora_classification_args(tiny_checkpoint, write_labelled_folder(tmp_path / "colours"))
    sharded = run_fsdp2([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    results = assert_adapters_agree(tmp_path / "one", tmp_path / "fsdp", "fsdp")
    assert results["fsdp"]["adapted"]["top1"] == results["one"]["adapted"]["top1"]


CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def run_deepspeed(config, module_args, processes=2, timeout=300):
    """`python -m <module> ...` under `accelerate launch` with a shipped DeepSpeed config on CPU processes: without
    ACCELERATE_USE_CPU (Accelerate would run the launch as plain DDP) and without CUDA, so that the scripts'
    Accelerator initialises DeepSpeed over gloo (`training.runtime.deepspeed_on_cpu_kwargs`)."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        "0",
        "-m",
        *module_args,
    ]
    return run_subprocess(command, env=env, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_stage1_on_cpu_processes_matches_one_process_resumes_exactly_and_exports(
    config, caption_folder, tiny_checkpoint, tmp_path
):
    """Stage 1 under a shipped DeepSpeed config on 2 CPU processes x batch 4 equals 1 process x batch 8 in losses and
    exported weights (1e-5); a run killed before its last checkpoint resumes from DeepSpeed's checkpoint to the same
    losses and weights bit for bit; the export has the scalar parameters in their checkpoint shape, and loads. The
    start is a saved folder, whose scalar `logit_scale` ZeRO-3 could not partition while loading
    (`training.sharding.whole_construction`)."""
    pytest.importorskip("deepspeed")
    common = [
        "training.stage1_contrastive",
        "--model",
        str(tiny_checkpoint),
        "--train-data",
        str(caption_folder),
        "--max-steps",
        "3",
        "--checkpoint-every",
        "2",
        "--log-with",
        "none",
        "--learning-rate",
        "1e-3",
    ]
    sharded = run_deepspeed(config, [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "ds")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "4 x 2 process(es)" in sharded.stdout, sharded.stderr[-3000:]
    checkpoint = tmp_path / "ds" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model").is_dir() and (checkpoint / "latest").is_file(), "not DeepSpeed's checkpoint"
    one_args = [*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]
    one = run_script(one_args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "8 x 1 process(es)" in one.stdout, one.stderr[-3000:]

    losses, weights_ds = assert_stage1_runs_agree(tmp_path / "one", tmp_path / "ds", steps=3)

    loaded, info = AgriCLIPModel.from_pretrained(tmp_path / "ds" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(getattr(loaded, name).dim() == 0 for name in SCALAR_PARAMETERS)
    state = loaded.state_dict()
    shared = [key for key in weights_ds if key in state]
    assert len(shared) > len(weights_ds) // 2 and "logit_scale" in shared
    for key in shared:
        assert torch.equal(state[key], weights_ds[key]), key

    kill_before_last_checkpoint(tmp_path / "ds", last_step=3)
    resumed = run_deepspeed(
        config, [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "ds"), "--resume", "latest"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stdout
    rows = [row for row in read_metrics(tmp_path / "ds", RUN) if "loss" in row]
    assert [row["loss"] for row in rows[-1:]] == losses["sharded"][-1:]
    final = load_file(tmp_path / "ds" / "final" / "model.safetensors")
    assert final.keys() == weights_ds.keys()
    for key in final:
        assert torch.equal(final[key], weights_ds[key]), key


def write_partitioning_zero3_config(folder: Path) -> Path:
    """training/configs/deepspeed_zero3.yaml with DeepSpeed's `stage3_param_persistence_threshold` at 0, so that
    ZeRO-3 partitions every parameter of the tiny model (by default, parameters of at most 1e5 elements stay whole,
    which is all of them)."""
    (folder / "zero3.json").write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {
                    "stage": 3,
                    "stage3_param_persistence_threshold": 0,
                    "stage3_gather_16bit_weights_on_model_save": True,
                },
            }
        )
    )
    text = (CONFIGS / "deepspeed_zero3.yaml").read_text()
    head, _ = text.split("deepspeed_config:")
    # Accelerate refuses a config file alongside the launcher's own DeepSpeed settings, `mixed_precision` among them.
    head = "".join(line for line in head.splitlines(keepends=True) if not line.startswith("mixed_precision:"))
    config = folder / "zero3.yaml"
    config.write_text(
        f"{head}deepspeed_config:\n  deepspeed_config_file: {folder / 'zero3.json'}\n  zero3_init_flag: false\n"
    )
    return config


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "zero3 partitioning all"])
def test_deepspeed_stage2_matches_one_process_and_exports_the_teacher(config, caption_folder, tmp_path):
    """Stage 2 under a DeepSpeed config on 2 CPU processes x batch 4 equals 1 process x batch 8: losses, and the
    exported model and backbone (the EMA teacher, updated from the student's parameters, which ZeRO-3 partitions
    where `write_partitioning_zero3_config` says so: `training.sharding.gathered_parameters`). The last layer is not
    frozen: DeepSpeed cannot (the next test)."""
    pytest.importorskip("deepspeed")
    if config == "zero3 partitioning all":
        config = write_partitioning_zero3_config(tmp_path)
    common = [*STAGE2_ARGS, "--train-data", str(caption_folder), "--freeze-last-layer-epochs", "0"]
    sharded = run_deepspeed(config, [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "ds")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert (tmp_path / "ds" / "checkpoints" / "checkpoint-2" / "pytorch_model").is_dir(), "not DeepSpeed's checkpoint"
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    assert_stage2_runs_agree(tmp_path / "one", tmp_path / "ds")


@pytest.mark.slow
def test_deepspeed_stage2_refuses_to_freeze_the_last_layer(caption_folder, tmp_path):
    """Under DeepSpeed the optimizer steps inside Accelerate's `backward`, before the last layer's gradients could
    be dropped: a run asked to freeze it stops with a message before its first step."""
    pytest.importorskip("deepspeed")
    args = [*STAGE2_ARGS, "--train-data", str(caption_folder), "--batch-size", "4", "--output-dir", str(tmp_path)]
    args += ["--freeze-last-layer-epochs", "1"]
    result = run_deepspeed("deepspeed_zero2.yaml", args)
    assert result.returncode != 0
    assert "cannot be frozen under DeepSpeed" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_lora_matches_one_process(config, tiny_checkpoint, tmp_path):
    """LoRA (classification) under ZeRO-2 and ZeRO-3 on 2 CPU processes x batch 4 equals 1 process x batch 8: the
    adapter weights and the held-out top-1 (scored in inference mode, where ZeRO-3 partitions the weights again:
    `training.sharding.leave_inference_mode`). Not yet under `write_partitioning_zero3_config`, where the held-out
    scoring still leaves an adapter weight an inference tensor."""
    pytest.importorskip("deepspeed")
    common = lora_classification_args(tiny_checkpoint, write_labelled_folder(tmp_path / "colours"))
    sharded = run_deepspeed(config, [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "ds")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "4 x 2 process(es)" in sharded.stdout, sharded.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    results = assert_adapters_agree(tmp_path / "one", tmp_path / "ds", "ds")
    assert results["ds"]["adapted"]["top1"] == results["one"]["adapted"]["top1"]


@pytest.mark.slow
def test_fsdp2_contrastive_lora_of_the_backbone_with_the_aligner_refit_matches_one_process(
    tiny_checkpoint, caption_folder, tmp_path
):
    """LoRA of the backbone with the contrastive objective on image-caption pairs, the aligner re-fit after, under
    FSDP2 on 2 processes x batch 4 equals 1 process x batch 8: the adapter weights and the held-out metrics."""
    common = [
        "training.lora_finetune",
        "--model",
        str(tiny_checkpoint),
        "--objective",
        "contrastive",
        "--towers",
        "backbone",
        "--refit-aligner",
        # 32 images, 48 backbone features: without a ridge the least-squares re-fit is underdetermined, and the two
        # runs' rounding moves its weights (of up to 10) by ~1e-3, the metrics alike.
        "--aligner-ridge",
        "0.1",
        "--train-data",
        str(caption_folder),
        "--eval-data",
        str(write_labelled_folder(tmp_path / "colours")),
        "--templates",
        "a photo of a {} leaf.",
        "--learning-rate",
        "1e-2",
        "--max-steps",
        "2",
        "--log-with",
        "none",
    ]
    sharded = run_fsdp2([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp")])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "4 x 2 process(es)" in sharded.stdout, sharded.stderr[-3000:]
    one = run_script([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    results = assert_adapters_agree(tmp_path / "one", tmp_path / "fsdp", "fsdp")
    assert results["one"]["n_train"] == results["fsdp"]["n_train"] == 32
    for section in ("zero_shot", "adapted_before_refit", "adapted", "aligner_refit"):
        for key, value in results["one"][section].items():
            if isinstance(value, float):
                assert results["fsdp"][section][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (section, key)
            else:
                assert results["fsdp"][section][key] == value, (section, key)
