"""The GPU sharding check (bench/gpu_sharding.py) on CPU: its FLOP count, peak table and share, the launch commands
and the configs they name, the answer without CUDA; and the reading of stage 1's logged parameters under ZeRO-3
(`training.sharding.parameter_values`), on 2 CPU processes where DeepSpeed is installed."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

from bench import gpu_sharding
from bench.bench_stage1 import make_batches
from bench.gpu_sharding import (
    ENGINES,
    engine_step,
    flops_per_sample,
    launch_command,
    peak_share,
    peak_tflops,
    print_report,
    stage1_flops_per_sample,
    summarise,
)
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from training.contrastive import contrastive_forward
from training.losses import ContrastiveLoss
from training.sharding import parameter_values

from conftest import run_subprocess


REPO = Path(__file__).resolve().parents[1]


def test_flops_per_sample_of_a_linear_layer_is_the_analytic_count():
    linear = torch.nn.Linear(24, 10)
    inputs = torch.randn(6, 24)
    # Forward 2*B*in*out; backward the weight's gradient, 2*B*in*out (the input needs none); bias sums uncounted.
    assert flops_per_sample(lambda: linear(inputs).sum(), 6) == 4 * 24 * 10
    inputs.requires_grad_(True)
    assert flops_per_sample(lambda: linear(inputs).sum(), 6) == 6 * 24 * 10


def test_stage1_flops_are_about_three_forwards_and_do_not_depend_on_the_counted_slice():
    config = AgriCLIPConfig.tiny()
    batches = make_batches(config, 16, 2)
    counted = stage1_flops_per_sample(config, batches, "cpu")

    model = AgriCLIPModel(config)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as forward:
        for batch in batches:
            contrastive_forward(model, batch, ContrastiveLoss())
    # The backward of a matmul is two matmuls; the patch embedding needs no input gradient, so a little under 3x.
    assert 2.5 < counted / (forward.get_total_flops() / 32) < 3.0

    # The whole batches, not the slices of COUNTED_SAMPLES: the same per sample but for the loss's B x B matrix.
    with torch.utils.flop_counter.FlopCounterMode(display=False) as whole:
        for batch in batches:
            contrastive_forward(model, batch, ContrastiveLoss()).backward()
    assert whole.get_total_flops() / 32 == pytest.approx(counted, rel=0.01)


def test_peak_lookup_override_and_share():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Some Future GPU") is None
    assert peak_tflops("Some Future GPU", override=500.0) == 500.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    assert peak_share(494.5, 989.0) == pytest.approx(0.5)
    assert peak_share(494.5, None) is None


def test_summary_gives_each_measured_engine_its_flop_rate_share_and_ratio_to_ddp(capsys):
    def measured(rate):
        return {"status": "ok", "samples_per_second": rate, "distributed_type": "NO", "peak_memory_gib": 1.0}

    def results():
        return {"ddp": measured(100.0), "fsdp2": measured(50.0), "zero2": {"status": "skipped", "reason": "no"}}

    summary = summarise(results(), flops=2e12, peak=400.0)
    assert summary["ddp"]["tflops"] == pytest.approx(200.0) and summary["fsdp2"]["tflops"] == pytest.approx(100.0)
    assert summary["ddp"]["peak_share"] == pytest.approx(0.5) and summary["fsdp2"]["peak_share"] == pytest.approx(0.25)
    assert summary["ddp"]["vs_ddp"] == 1.0 and summary["fsdp2"]["vs_ddp"] == 0.5
    assert "tflops" not in summary["zero2"]

    unknown = summarise(results(), flops=2e12, peak=None)
    assert unknown["fsdp2"]["peak_share"] is None and unknown["fsdp2"]["tflops"] == pytest.approx(100.0)
    print_report(unknown, "Some Future GPU", None)
    lines = capsys.readouterr().out.splitlines()
    assert "unknown" in lines[2] and lines[3] == "zero2   skipped: no"
    assert lines[-1] == "the bf16 dense peak of Some Future GPU is not known here: pass --peak-tflops for the share"


def test_the_engine_step_runs_stage1s_update_under_a_plain_accelerator():
    config = AgriCLIPConfig.tiny()
    torch.manual_seed(0)
    step = engine_step(config, Accelerator(cpu=True), batch_size=4)
    step(make_batches(config, 4, 1)[0])


def test_launch_commands_name_the_shipped_configs():
    expected = {"fsdp2": ("FSDP", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}
    for engine in ENGINES:
        command = launch_command(engine, ["--steps", "1"])
        assert command[command.index("--num_processes") + 1] == "1"
        assert command[command.index("--mixed_precision") + 1] == "bf16"
        assert command[-4:] == ["--worker", engine, "--steps", "1"]
        if engine == "ddp":
            assert "--config_file" not in command
            continue
        config_file = Path(command[command.index("--config_file") + 1])
        assert config_file.parent == REPO / "training" / "configs" and config_file.exists()
        config = yaml.safe_load(config_file.read_text())
        distributed_type, zero_stage = expected[engine]
        assert config["distributed_type"] == distributed_type
        if zero_stage is None:
            assert config["fsdp_config"]["fsdp_version"] == 2
        else:
            assert config["deepspeed_config"]["zero_stage"] == zero_stage
    zero3 = yaml.safe_load((REPO / "training" / "configs" / "deepspeed_zero3.yaml").read_text())
    # The export gathers the whole weights (`accelerator.get_state_dict`), which ZeRO-3 refuses without this.
    assert zero3["deepspeed_config"]["zero3_save_16bit_model"] is True


def test_without_cuda_the_check_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_sharding"])
    gpu_sharding.main()  # returns: exit status 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "no CUDA device: this check measures stage-1 training throughput on a GPU; nothing was run"
    ]


def test_parameter_values_without_deepspeed_are_the_parameters_values(tiny_config):
    model = AgriCLIPModel(tiny_config)
    scale, bias = parameter_values(Accelerator(cpu=True), model.logit_scale, model.logit_bias)
    assert scale.item() == model.logit_scale.item() and bias.item() == model.logit_bias.item()
    assert not scale.requires_grad


# Run by `accelerate launch` with the shipped ZeRO-3 config on 2 CPU processes. DeepSpeed runs there over gloo when
# the Accelerator is given that backend and ACCELERATE_USE_CPU is unset (the stage scripts' Accelerator is not).
ZERO3_WORKER = """
import copy

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from training.contrastive import contrastive_forward, trainable_clip
from training.losses import ContrastiveLoss
from training.runtime import CheckpointManager, TrainingPosition, train_step
from training.sharding import full_state_dict, parameter_values, prepare_for_sharding

# Built before the Accelerator: after it, transformers builds the model partitioned (Accelerate tells it ZeRO-3 is
# on), with other random weights than the one-process reference.
torch.manual_seed(0)
model = AgriCLIPModel(AgriCLIPConfig.tiny()).train()
trainable_clip(model, freeze_text=False, freeze_image=False)
reference = copy.deepcopy(model)
accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
model = prepare_for_sharding(accelerator, model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
deepspeed = accelerator.state.deepspeed_plugin.deepspeed_config
deepspeed["train_micro_batch_size_per_gpu"] = 4
# Partition every parameter, logit_scale too (by default DeepSpeed keeps parameters under 1e5 elements whole).
deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] = 0
model, optimizer = accelerator.prepare(model, optimizer)
logit_scale = accelerator.unwrap_model(model).logit_scale

def batch_of(rank):
    generator = torch.Generator().manual_seed(rank)
    return {
        "input_ids": torch.randint(0, 1000, (4, 7), generator=generator),
        "attention_mask": torch.ones(4, 7, dtype=torch.long),
        "pixel_values": torch.randn(4, 3, 64, 64, generator=generator),
    }

batch, loss_fn = batch_of(accelerator.process_index), ContrastiveLoss()
loss = train_step(
    accelerator, model, optimizer, lambda: contrastive_forward(model, batch, loss_fn), 1e-2, 1.0,
    TrainingPosition(), CheckpointManager(accelerator, "unused"),
)
assert logit_scale.numel() == 0, "logit_scale is not partitioned: the check checks nothing"
(scale,) = parameter_values(accelerator, logit_scale)

# The same step as one process takes it: the global batch, clipping, AdamW. The model's own loss, which gathers
# nothing (the stage's loss would gather across these processes).
both = {key: torch.cat([batch_of(0)[key], batch_of(1)[key]]) for key in batch}
reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
reference_loss = reference(**both, image_embedding="clip", return_loss=True).loss
reference_loss.backward()
torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 1.0)
reference_optimizer.step()
torch.testing.assert_close(loss.detach(), reference_loss.detach())
torch.testing.assert_close(scale, reference.logit_scale.detach().reshape(1))

state = full_state_dict(accelerator, model)
if accelerator.is_main_process:
    assert state["logit_scale"].shape == () and state["logit_bias"].shape == ()
    torch.testing.assert_close(state["logit_scale"], reference.logit_scale.detach())
accelerator.print("zero3 ok")
"""


@pytest.mark.slow
def test_zero3_stage1_step_matches_one_process_and_reads_the_partitioned_scale(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_worker.py"
    script.write_text(ZERO3_WORKER)
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "training" / "configs" / "deepspeed_zero3.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        str(script),
    ]
    result = run_subprocess(command, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zero3 ok" in result.stdout
