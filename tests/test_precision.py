"""bf16 mixed precision on the CPU (`--mixed-precision bf16`, what `accelerate launch --mixed-precision bf16` sets):
stages 1 and 2 and LoRA run their forward passes under Accelerate's CPU autocast, resume exactly, and keep float32
weights in their checkpoints and exports."""

import functools
import json

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import training.contrastive
import training.distillation
import training.lora
from modeling_agriclip import AgriCLIPModel
from training import lora_finetune, stage1_contrastive, stage2_dino
from training.dino import MultiCropWrapper

from conftest import assert_same_tensors, kill_before_last_checkpoint, read_metrics, write_labelled_folder


BF16 = ("--mixed-precision", "bf16")


@pytest.fixture
def reset_precision():
    """Accelerate holds one precision per process (`AcceleratorState`) and refuses another: the state is cleared
    before this test, so that its bf16 runs can follow the other tests' float32 ones, and after it, so that no
    later test inherits bf16. A test calls it between runs of different precisions."""

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)

    reset()
    yield reset
    reset()


def record_autocast(monkeypatch, owner, name: str) -> list[torch.dtype]:
    """Patches method `name` of class `owner` to record, at each call, the dtype CPU autocast computes in (float32
    when autocast is off); returns the list it fills."""
    seen, method = [], getattr(owner, name)

    @functools.wraps(method)  # its signature too, which callers inspect
    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


def assert_float32(*files) -> None:
    for path in files:
        dtypes = {tensor.dtype for tensor in load_file(path).values()}
        assert dtypes == {torch.float32}, f"{path}: {dtypes}"


def run_stage1(data, output, *flags):
    return stage1_contrastive.main(
        [
            "--model",
            "tiny",
            "--train-data",
            str(data),
            "--output-dir",
            str(output),
            "--batch-size",
            "8",
            "--log-with",
            "none",
            "--learning-rate",
            "1e-3",
            *flags,
        ]
    )


def test_stage1_under_bf16_trains_in_bf16_keeps_float32_weights_and_resumes_exactly(
    caption_folder, tmp_path, monkeypatch, reset_precision
):
    """The towers' training forward runs under bf16 autocast (validation stays float32); the final model and every
    checkpoint hold float32 weights; a run stopped after its step-2 checkpoint resumes to the same weights bit for
    bit; and the result is the float32 run's to bf16 rounding, not the float32 run itself."""
    calls = record_autocast(monkeypatch, AgriCLIPModel, "get_text_features")
    flags = ("--max-steps", "4", "--checkpoint-every", "2", *BF16)
    straight = run_stage1(caption_folder, tmp_path / "straight", *flags)
    assert calls.count(torch.bfloat16) == 4 and torch.float32 in calls
    assert_float32(straight / "model.safetensors", *(tmp_path / "straight" / "checkpoints").glob("*/model.safetensors"))
    options = json.loads((tmp_path / "straight" / "checkpoints" / "checkpoint-4" / "run_options.json").read_text())
    assert options["mixed_precision"] == "bf16"
    logged = json.loads((tmp_path / "straight" / "logs" / training.contrastive.RUN / "config.json").read_text())
    assert logged["mixed_precision"] == "bf16" and logged["num_processes"] == 1  # the launcher's choice, logged
    losses = [row["loss"] for row in read_metrics(tmp_path / "straight", training.contrastive.RUN) if "loss" in row]
    assert len(losses) == 4 and torch.isfinite(torch.tensor(losses)).all()

    interrupted = tmp_path / "interrupted"
    run_stage1(caption_folder, interrupted, *flags)
    kill_before_last_checkpoint(interrupted, 4)
    resumed = run_stage1(caption_folder, interrupted, *flags, "--resume")
    bf16_weights = load_file(straight / "model.safetensors")
    assert_same_tensors(bf16_weights, load_file(resumed / "model.safetensors"))

    reset_precision()
    float32_weights = load_file(
        run_stage1(caption_folder, tmp_path / "float32", "--max-steps", "4", "--mixed-precision", "no")
        / "model.safetensors"
    )
    assert any(not torch.equal(float32_weights[key], bf16_weights[key]) for key in bf16_weights)
    # AdamW moves a weight by about the learning rate per step whatever the gradient's rounding: 4 steps of 1e-3.
    for key in bf16_weights:
        torch.testing.assert_close(bf16_weights[key], float32_weights[key], rtol=0, atol=1e-2, msg=key)


def test_stage2_under_bf16_trains_the_student_in_bf16_and_keeps_float32_weights(
    caption_folder, tmp_path, monkeypatch, reset_precision
):
    """The student's forward runs under bf16 autocast; the DINO loss, KoLeo and the k-NN evaluation run on float32
    values; the exported backbone, the final model and the checkpoint (with its
    teacher and loss centre) are float32."""
    calls = record_autocast(monkeypatch, MultiCropWrapper, "forward")
    output = tmp_path / "stage2"
    stage2_dino.main(
        [
            "--model",
            "tiny",
            "--train-data",
            str(caption_folder),
            "--output-dir",
            str(output),
            "--batch-size",
            "8",
            "--out-dim",
            "128",
            "--head-hidden-dim",
            "32",
            "--head-bottleneck-dim",
            "16",
            "--num-local-crops",
            "2",
            "--log-with",
            "none",
            "--max-steps",
            "2",
            "--checkpoint-every",
            "2",
            "--koleo-weight",
            "0.1",
            "--knn-data",
            str(write_labelled_folder(tmp_path / "colours")),
            *BF16,
        ]
    )
    assert calls.count(torch.bfloat16) == 2  # the student at each step (the teacher runs as stage 2 runs it)
    checkpoint = output / "checkpoints" / "checkpoint-2"
    assert_float32(
        output / "backbone" / "model.safetensors",
        output / "final" / "model.safetensors",
        checkpoint / "model.safetensors",
    )
    for state in checkpoint.glob("custom_checkpoint_*.pkl"):  # the teacher and the DINO loss's centre
        tensors = torch.load(state, weights_only=True).values()
        assert {tensor.dtype for tensor in tensors if tensor.is_floating_point()} == {torch.float32}, state.name
    rows = [row for row in read_metrics(output, training.distillation.RUN) if "loss" in row]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([row["loss"], row["koleo"]])).all() for row in rows)
    report = json.loads((output / "final" / "stage2_report.json").read_text())
    assert 0 <= report["knn_top1_trained"] <= 1


def test_lora_under_bf16_trains_in_bf16_and_keeps_float32_adapters(
    tiny_checkpoint, tmp_path, monkeypatch, reset_precision
):
    """A classification run on the backbone with the aligner trained: its training forward under bf16 autocast
    (held-out evaluation in float32), and the checkpointed adapter, the exported adapter and the merged model in
    float32."""
    calls = record_autocast(monkeypatch, AgriCLIPModel, "get_image_features")
    output = tmp_path / "lora"
    lora_finetune.main(
        [
            "--model",
            str(tiny_checkpoint),
            "--output-dir",
            str(output),
            "--log-with",
            "none",
            "--batch-size",
            "8",
            "--train-data",
            str(write_labelled_folder(tmp_path / "colours")),
            "--templates",
            "a photo of a {} leaf.",
            "--learning-rate",
            "1e-2",
            "--shots",
            "3",
            "--max-steps",
            "2",
            "--checkpoint-every",
            "2",
            "--train-aligner",
            "--merge",
            *BF16,
        ]
    )
    assert calls.count(torch.bfloat16) == 2 and torch.float32 in calls
    assert_float32(
        output / "checkpoints" / "checkpoint-2" / "adapter_state.safetensors",
        output / "adapter" / "adapter_model.safetensors",
        output / "merged" / "model.safetensors",
    )
    losses = [row["loss"] for row in read_metrics(output, training.lora.RUN) if "loss" in row]
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses)).all()
