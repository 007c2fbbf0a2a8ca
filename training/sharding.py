"""Sharded training (FSDP2 or DeepSpeed ZeRO through Accelerate's plugins) of the AgriCLIP model: what the training
scripts do around `accelerator.prepare` so that `accelerate launch --config_file training/configs/fsdp2.yaml` works
(and deepspeed_zero2.yaml / deepspeed_zero3.yaml, as far as the end of this docstring says).

- `enable_fsdp_on_cpu`: Accelerate runs an FSDP config on CPU processes (ACCELERATE_USE_CPU=1, gloo) as plain DDP
  (`MULTI_CPU`) and says nothing; here such a launch gets the FSDP plugin the config asked for (PyTorch's
  `fully_shard` runs on gloo), so a sharded run can be checked on CPUs before it goes to GPUs.
- `prepare_for_sharding`, before the optimizer is built and the model prepared: `fully_shard` refuses 0-dimensional
  parameters ("Change logit_scale to a 1D tensor with numel equal to 1"), and so does DeepSpeed 0.19 at any ZeRO stage
  (it broadcasts and partitions each parameter as `param.data.view(torch.uint8)`: "self.dim() cannot be 0 to view
  Float as Byte"), so `logit_scale` and `logit_bias` become 1-element tensors of shape (1,) for the run (the same
  values and the same arithmetic: they only broadcast); under FSDP the wrap policy gets the model's blocks without
  the text embeddings, which Accelerate shards as a unit of their own (`get_input_embeddings`) and cannot also shard
  inside a wrapped `CLIPTextEmbeddings`. The exported model keeps the scalar parameters of the checkpoint format
  (`full_state_dict`).
- `register_feature_methods`: the feature methods (`get_text_features`, ...) run outside `forward`; FSDP2 gathers
  the root's parameters only around `forward`, so they are registered as forward methods (validation calls them).
  ZeRO-3 gathers each submodule's parameters around that submodule's own call (the root's only parameters are
  `logit_scale` and `logit_bias`, which the feature methods do not read), but for tables a module reads before calling
  them (see below).
- `parameter_values`: parameters read outside the forward (stage 1 logs the temperature and the bias after each step)
  are sharded there under FSDP2 (DTensors) and under ZeRO-3 (an empty tensor unless DeepSpeed keeps the parameter
  whole: `stage3_param_persistence_threshold`, 1e5 elements by default); it returns them whole. The loss needs no such
  help: it reads `logit_scale` from the forward's output, which FSDP2's hook here (`_own_scalars`) and ZeRO-3 itself
  (a parameter a module returns is gathered as an "external" parameter) keep whole through the backward.
- `full_state_dict`: the model's full state dict, gathered on every process (each must join the gather), with the
  scalar parameters back in their checkpoint shape; `training.runtime.export_atomically` saves it. Under DeepSpeed
  (training/configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml) it is `accelerator.get_state_dict`, which gathers
  ZeRO-3's partitioned weights (the config's `zero3_save_16bit_model: true`).

DeepSpeed under the stage scripts also runs on CPU processes, over gloo (DeepSpeed picks its CPU accelerator):
    CUDA_VISIBLE_DEVICES= accelerate launch --config_file training/configs/deepspeed_zero2.yaml --num_processes 2 \
        -m training.stage1_contrastive ...
(or deepspeed_zero3.yaml), with ACCELERATE_USE_CPU unset and the config's `use_cpu: false`. Accelerate 1.16
(accelerate/state.py, `PartialState.__init__`) would initialise DeepSpeed's processes there with no backend and then
count a single process (`self.backend is None`), so the scripts' Accelerator is given gloo for a DeepSpeed launch
without CUDA (`training.runtime.deepspeed_on_cpu_kwargs`); with ACCELERATE_USE_CPU=1 Accelerate skips DeepSpeed
altogether and runs the launch as plain DDP (`AcceleratorState.__init__`: `... and not cpu`).
`register_feature_methods` registers, under ZeRO-3, the position tables that transformers' CLIP embeddings read
before calling them (`register_read_tables`): partitioned, they read as 0 rows, and validation failed so after a
resume.

What is verified, on 2 CPU processes over gloo (DeepSpeed 0.19.8): tests/test_sharding.py runs stage 1 end to end
from a saved folder under both configs against a plain one-process run on the same global batch: losses and exported
weights to 1e-5, a resume from DeepSpeed's checkpoint (`accelerator.save_state`) exact bit for bit, and an export that
loads with the scalar parameters in their checkpoint shape; tests/test_gpu_sharding.py checks `parameter_values` on a
`logit_scale` that ZeRO-3 partitions (the stage's config leaves it whole). Stage 2 under ZeRO-2, ZeRO-3, and ZeRO-3
with `stage3_param_persistence_threshold: 0` (every parameter of the tiny model partitioned; the EMA teacher reads
the student through `gathered_parameters`) equals one process in losses, teacher entropy and KL, and the exported
model and backbone (1e-5), with `--freeze-last-layer-epochs 0`: under DeepSpeed the optimizer steps inside
Accelerate's `backward`, so stage 2 refuses to freeze the DINO head's last layer there. LoRA (classification) under
ZeRO-2 and ZeRO-3 equals one process in adapter weights and held-out top-1 (`register_read_tables`,
`leave_inference_mode`); contrastive LoRA of the backbone with the aligner
re-fit, under FSDP2, in adapter weights (the re-fit aligner included) and held-out metrics. The model is built whole
and partitioned at `prepare` (`whole_construction`). Not verified: any DeepSpeed run on a GPU, bf16 under DeepSpeed,
a stage 2 resume under DeepSpeed. Known wrong: LoRA under ZeRO-3 with every parameter partitioned
(`stage3_param_persistence_threshold: 0`) still fails after its held-out scoring ("Setting requires_grad=True on
inference tensor outside InferenceMode").
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


# The model's 0-dimensional parameters, which `fully_shard` cannot shard.
SCALAR_PARAMETERS = ("logit_scale", "logit_bias")
# Methods a training script calls on the model besides `forward`.
FEATURE_METHODS = ("get_text_features", "get_clip_image_features", "get_backbone_features", "get_image_features")


def fsdp_requested() -> bool:
    """Whether the launcher was given an FSDP config (`accelerate launch` sets ACCELERATE_USE_FSDP from it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turns a multi-process CPU run that an FSDP config launched into the FSDP run it asked for.

    Accelerate only enables its FSDP plugin on accelerators; on CPU processes it runs such a launch as DDP. FSDP2 runs
    on gloo, so the plugin built from the launcher's environment is installed on the shared state. An FSDP1 config
    on CPU processes is refused (it would silently run as DDP).
    """
    if not (fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise RuntimeError(
            f"an FSDP{plugin.fsdp_version} config was launched on CPU processes, which Accelerate would run as plain "
            "DDP without saying so; sharding on CPU processes runs FSDP2 only: set `fsdp_version: 2` (see "
            "training/configs/fsdp2.yaml)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator: Accelerator) -> bool:
    """Whether DeepSpeed partitions the parameters (ZeRO stage 3)."""
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


@contextmanager
def whole_construction(accelerator: Accelerator):
    """Builds or loads the model inside whole under ZeRO-3 with `zero3_init_flag: false`; DeepSpeed partitions it at
    `prepare`. Accelerate 1.16 registers its DeepSpeed config with transformers whatever the flag says
    (`DeepSpeedPlugin.set_deepspeed_weakref`), so transformers would otherwise partition the model as it is made: a
    saved folder then fails on its 0-dimensional `logit_scale` ("self.dim() cannot be 0 to view Float as Byte") and
    a preset draws other random weights from the same seed than without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin if is_zero3(accelerator) else None
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def prepare_for_sharding(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Makes `model` (an `AgriCLIPModel`, not yet prepared, before its optimizer is built) shardable by FSDP2 or
    DeepSpeed; a no-op without either. See the module's docstring."""
    if not (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        return model
    for name in SCALAR_PARAMETERS:
        parameter = getattr(model, name, None)
        if isinstance(parameter, torch.nn.Parameter) and parameter.dim() == 0:
            setattr(
                model, name, torch.nn.Parameter(parameter.detach().reshape(1), requires_grad=parameter.requires_grad)
            )
    if not is_fsdp(accelerator):
        return model
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None and hasattr(model, "get_input_embeddings"):
        # Accelerate shards the input embedding on its own; the module holding it must not be a unit too.
        embedding = model.get_input_embeddings()
        holders = {
            type(module).__name__
            for module in model.modules()
            if any(child is embedding for child in module.modules()) and module is not model
        }
        present = {type(module).__name__ for module in model.modules()}
        plugin.transformer_cls_names_to_wrap = [
            name for name in model._no_split_modules if name in present and name not in holders
        ]
    return model


def _own_scalars(module, args, kwargs, output):
    """A forward hook that runs before FSDP2 reshards the root: the output's `logit_scale` and `logit_bias` (the
    parameters themselves, whose unsharded storage FSDP frees after the forward) become copies that keep the
    gradient path to the parameters."""
    for name in SCALAR_PARAMETERS:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            setattr(output, name, value.clone())
    return output


def register_feature_methods(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Lets the prepared FSDP2 `model`'s feature methods gather its parameters as `forward` does, and keeps the
    parameters the forward returns readable after it (`_own_scalars`); under ZeRO-3, registers the position tables
    that a module reads before calling them (`register_read_tables`)."""
    if is_zero3(accelerator):
        register_read_tables(accelerator, model)
        return
    if not (is_fsdp(accelerator) and accelerator.is_fsdp2):
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in FEATURE_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    model.register_forward_hook(_own_scalars, with_kwargs=True, prepend=True)


def register_read_tables(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters around its call, a submodule's around the submodule's call: transformers'
    `CLIPTextEmbeddings.forward` reads `self.position_embedding.weight.shape[0]` (the longest sequence) before calling
    `position_embedding`, and sees 0 where the table is partitioned ("Sequence length must be less than
    max_position_embeddings ... max_position_embeddings: 0"; seen in validation after a resume). Registered as an
    external parameter of the embeddings module, the table is gathered around that module's call as well."""
    if not is_zero3(accelerator):
        return
    from deepspeed.runtime.zero import register_external_parameter

    for module in model.modules():
        table = getattr(module, "position_embedding", None)
        if isinstance(table, torch.nn.Embedding) and hasattr(table.weight, "ds_id"):
            register_external_parameter(module, table.weight)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a possibly sharded tensor (a DTensor's `full_tensor`, a collective every process must join)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if full_tensor is not None else tensor


def parameter_values(accelerator: Accelerator, *parameters: torch.nn.Parameter) -> list[torch.Tensor]:
    """Whole, detached values of parameters of the prepared model, read outside its forward (the logs): under FSDP2
    a DTensor's full tensor; under ZeRO-3 the parameter gathered for the read where it is partitioned (a parameter
    of DeepSpeed's persistence threshold or smaller stays whole, so that the gather is mostly skipped). A collective
    under both: call it on every process."""
    if not is_zero3(accelerator):
        return [full_value(parameter.detach()) for parameter in parameters]
    with _gathered_partitions(parameters):
        return [parameter.detach().clone() for parameter in parameters]


@contextmanager
def _gathered_partitions(parameters):
    """Under ZeRO-3, the ones of `parameters` that DeepSpeed holds partitioned gathered for the duration, read-only
    (`GatheredParameters` without a modifier rank: partitioned again on exit, unchanged). Every process holds the
    same parameters in the same state, so that all join the same gather."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = [p for p in parameters if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    with GatheredParameters(partitioned):
        yield


@contextmanager
def gathered_parameters(accelerator: Accelerator, module: torch.nn.Module):
    """`module`'s parameters whole for the duration, for reading outside its forward (stage 2's EMA teacher reads
    the student's): under ZeRO-3 those DeepSpeed partitions (an empty tensor each otherwise) are gathered, read-only
    (`_gathered_partitions`); a no-op otherwise (FSDP2's DTensors are gathered by `full_value`). A collective under
    ZeRO-3: enter it on every process."""
    if not is_zero3(accelerator):
        yield module
        return
    with _gathered_partitions(list(module.parameters())):
        yield module


def leave_inference_mode(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Under ZeRO-3, turns the parameters that DeepSpeed partitioned again inside `torch.inference_mode` (where the
    zero-shot classifier runs) back into normal tensors: the placeholder a partitioned parameter keeps is then made
    there, an inference tensor, on which PEFT can no longer set requires_grad ("Setting requires_grad=True on
    inference tensor outside InferenceMode"). The partitions themselves (`ds_tensor`) are untouched."""
    if not is_zero3(accelerator):
        return
    for parameter in model.parameters():
        if parameter.data.is_inference():
            parameter.data = parameter.data.clone()


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared model's full state dict, gathered on every process (a collective: call it on all), with the
    parameters `prepare_for_sharding` reshaped back to their checkpoint shape (scalars); under DeepSpeed the weights
    gathered onto the main process (None on the others; ZeRO-3 needs `zero3_save_16bit_model: true`); None without
    FSDP or DeepSpeed (the model's own state dict is then what `save_pretrained` writes)."""
    if not (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        return None
    state = accelerator.get_state_dict(model)
    if not state:
        return None
    return {
        key: value.reshape(()) if key.split(".")[-1] in SCALAR_PARAMETERS and value.numel() == 1 else value
        for key, value in state.items()
    }


@contextmanager
def plain_class(module: torch.nn.Module):
    """`module` seen as its own class for the duration: `fully_shard` swaps a module's class for a generated
    `FSDP<Name>` subclass, whose source file (torch's) `save_pretrained` would copy as the model's custom code in
    place of `modeling_agriclip.py`."""
    from torch.distributed.fsdp import FSDPModule

    sharded = type(module)
    if not isinstance(module, FSDPModule):
        yield module
        return
    module.__class__ = next(cls for cls in sharded.__mro__[1:] if not issubclass(cls, FSDPModule))
    try:
        yield module
    finally:
        module.__class__ = sharded


@contextmanager
def gathered(accelerator: Accelerator, model: torch.nn.Module):
    """The prepared FSDP2 `model`'s root parameters gathered for the duration, so that code calling its submodules
    outside `forward` (evaluation through a wrapped model's feature methods) reads whole tensors; the blocks that
    are units of their own gather themselves when they run. A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    if not (is_fsdp(accelerator) and isinstance(model, FSDPModule)):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def submodule_state_dict(state: dict | None, root: torch.nn.Module, module: torch.nn.Module) -> dict | None:
    """The entries of `root`'s state dict `state` that belong to its submodule `module`, named as in `module`."""
    if state is None:
        return None
    prefix = next((f"{name}." for name, child in root.named_modules() if child is module and name), "")
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
