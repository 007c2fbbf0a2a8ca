"""Builds an AgriCLIP checkpoint folder (model + processor) from pretrained parts.

Sources, each optional (a missing part comes randomly initialised from ``--preset``):

- ``--clip``: a transformers CLIP checkpoint (folder or Hub id, e.g. ``openai/clip-vit-base-patch16``), giving
  the text and image towers, their projections, the logit scale and the tokenizer;
- ``--dino``: a transformers checkpoint of a supported backbone family (``modeling_agriclip.backbones``: ViT, DINOv2,
  ResNet, ConvNeXt; folder or Hub id, e.g. ``facebook/dino-vitb16``);
- the official AgriCLIP release: ``--official-dino`` (a torchvision-layout DINO ResNet state dict, e.g.
  ``dino_pretrain.pth``) and ``--official-aligner`` (a file holding tensors ``W`` (out, in) and ``b`` (out,)).
  Both are read with ``torch.load(weights_only=True)``: no pickled code ever runs.

Example::

    agriclip convert --clip openai/clip-vit-base-patch16 \\
        --official-dino Weights/dino_pretrain.pth --official-aligner Weights/Agri_Dino_aligner_DPT_CPT.pth \\
        --output agriclip-official
"""

from __future__ import annotations

import pickle
import re
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPModel, ResNetConfig

from agriclip.errors import CLIError, ExitCode

from .backbones import BACKBONE_FAMILIES, backbone_family
from .configuration_agriclip import AgriCLIPConfig
from .modeling_agriclip import AgriCLIPModel, unreadable_weights_named
from .processing_agriclip import AgriCLIPProcessor
from .zero_shot import model_source_options


# `tiny` has a ViT backbone; every other backbone family has its `tiny_<model_type>` (tiny_resnet, tiny_convnext, ...).
PRESETS = {
    "tiny": AgriCLIPConfig.tiny,
    **{f"tiny_{name}": partial(AgriCLIPConfig.tiny, backbone=name) for name in BACKBONE_FAMILIES if name != "vit"},
    "paper": AgriCLIPConfig.paper,
    "vit_b16": AgriCLIPConfig.vit_b16,
}


def names_random_weights(model: str | Path) -> bool:
    """Whether a `--model` of the training scripts builds its weights at random: a preset name or a JSON file of
    config values over one (`training.models.load_model_and_processor`), rather than a saved model."""
    return str(model) in PRESETS or str(model).endswith(".json")


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads a `.pth`/`.pt` file of tensors without executing pickled code (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects beyond tensors; refusing to load it, since that would run code from the file "
            f"({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?): {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} must hold a flat dict of tensors, got {type(state).__name__}")
    return state


def load_official_aligner(path: str | Path, in_features: int | None = None, out_features: int | None = None):
    """Reads an official AgriCLIP aligner `{'W': (out, in), 'b': (out,)}`, applied as `x @ W.T + b`.

    The released files were exported with the original code's bias scaling; loading them as they are reproduces
    the official computation exactly.
    """
    state = load_tensor_file(path)
    missing = {"W", "b"} - state.keys()
    if missing:
        raise ValueError(f"{path} lacks the aligner tensor(s) {sorted(missing)}; found {sorted(state)}")
    weight, bias = state["W"], state["b"]
    if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{path}: W must be (out, in) and b (out,), got W {tuple(weight.shape)} and b {tuple(bias.shape)}"
        )
    expected = (out_features or weight.shape[0], in_features or weight.shape[1])
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"{path}: the aligner maps {weight.shape[1]} -> {weight.shape[0]} features, but the model needs "
            f"{expected[1]} -> {expected[0]} (backbone features -> projection_dim)"
        )
    return weight.float(), bias.float()


def torchvision_resnet_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a torchvision-layout ResNet state dict to transformers' `ResNetModel` layout (drops `fc.*`)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key.startswith("fc."):
            continue
        key = re.sub(r"^conv1\.", "embedder.embedder.convolution.", key)
        key = re.sub(r"^bn1\.", "embedder.embedder.normalization.", key)
        block = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
        if block:
            rest = re.sub(r"^conv(\d)\.", lambda m: f"layer.{int(m[1]) - 1}.convolution.", block[3])
            rest = re.sub(r"^bn(\d)\.", lambda m: f"layer.{int(m[1]) - 1}.normalization.", rest)
            rest = rest.replace("downsample.0.", "shortcut.convolution.").replace(
                "downsample.1.", "shortcut.normalization."
            )
            key = f"encoder.stages.{int(block[1]) - 1}.layers.{block[2]}.{rest}"
        renamed[key] = value
    return renamed


def resnet_config_from_torchvision(state_dict: dict[str, torch.Tensor]) -> ResNetConfig:
    """Infers the `ResNetConfig` (v1.5: stride on the 3x3 convolution) of a torchvision-layout state dict."""
    state_dict = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state_dict.items()}
    if "conv1.weight" not in state_dict:
        raise ValueError("not a torchvision-layout ResNet state dict: 'conv1.weight' is missing")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    last_conv = "conv3" if bottleneck else "conv2"
    depths, hidden_sizes = [], []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{stage}.")}
        depths.append(len(blocks))
        hidden_sizes.append(state_dict[f"layer{stage}.0.{last_conv}.weight"].shape[0])
    return ResNetConfig(
        layer_type="bottleneck" if bottleneck else "basic",
        depths=depths,
        hidden_sizes=hidden_sizes,
        embedding_size=state_dict["conv1.weight"].shape[0],
        downsample_in_bottleneck=False,
    )


def convert(
    output: str | Path | None = None,
    clip: str | None = None,
    dino: str | None = None,
    official_dino: str | Path | None = None,
    official_aligner: str | Path | None = None,
    preset: str = "paper",
    image_embedding: str | None = None,
) -> tuple[AgriCLIPModel, AgriCLIPProcessor]:
    """Assembles an AgriCLIP model and processor from the given parts and, with `output`, saves them there."""
    if dino and official_dino:
        raise ValueError("give either --dino or --official-dino, not both")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    base = PRESETS[preset]()
    config_kwargs = {
        "text_config": base.text_config,
        "vision_config": base.vision_config,
        "dino_config": base.dino_config,
        "projection_dim": base.projection_dim,
        "image_embedding": image_embedding or base.image_embedding,
    }
    clip_model = dino_state = None
    # Checked before anything loads: a folder without config.json, a Hub id offline or out of reach.
    options = {source: model_source_options(source) for source in (clip, dino) if source}
    if clip:
        with unreadable_weights_named(clip):
            clip_model = CLIPModel.from_pretrained(clip, dtype=torch.float32, trust_remote_code=False, **options[clip])
        config_kwargs.update(
            text_config=clip_model.config.text_config,
            vision_config=clip_model.config.vision_config,
            projection_dim=clip_model.config.projection_dim,
            logit_scale_init_value=clip_model.config.logit_scale_init_value,
        )
    if dino:
        with unreadable_weights_named(dino):
            dino_model = AutoModel.from_pretrained(dino, dtype=torch.float32, trust_remote_code=False, **options[dino])
        try:
            backbone_family(dino_model.config)
        except ValueError as error:
            raise ValueError(f"{dino}: {error}") from None
        config_kwargs["dino_config"] = dino_model.config
        dino_state = {k: v for k, v in dino_model.state_dict().items() if not k.startswith("pooler.")}
    if official_dino:
        torchvision_state = load_tensor_file(official_dino)
        try:
            config_kwargs["dino_config"] = resnet_config_from_torchvision(torchvision_state)
        except ValueError as error:
            raise ValueError(f"{official_dino}: {error}") from None
        dino_state = torchvision_resnet_to_transformers(torchvision_state)

    model = AgriCLIPModel(AgriCLIPConfig(**config_kwargs)).eval()
    if clip_model is not None:
        missing, unexpected = model.load_state_dict(clip_model.state_dict(), strict=False)
        if unexpected or any(k.startswith(("text_", "vision_", "visual_")) for k in missing):
            raise ValueError(f"{clip}: CLIP weights do not fit (missing {missing}, unexpected {unexpected})")
        model.logit_scale.data.copy_(clip_model.logit_scale.data)
    if dino_state is not None:
        source = dino or official_dino
        try:
            model.dino_model.load_state_dict(dino_state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{source}: backbone weights do not fit the backbone config: {error}") from None
    if official_aligner:
        weight, bias = load_official_aligner(
            official_aligner, model.config.backbone_hidden_size, model.config.projection_dim
        )
        model.aligner.weight.data.copy_(weight)
        model.aligner.bias.data.copy_(bias)

    tokenizer = AutoTokenizer.from_pretrained(clip, trust_remote_code=False) if clip else None
    processor = AgriCLIPProcessor.from_config(model.config, tokenizer=tokenizer)
    if output is not None:
        model.save_pretrained(output)
        processor.save_pretrained(output)
    return model, processor


def run(args) -> int:
    """`agriclip convert` (arguments parsed by `agriclip.cli`)."""
    try:
        convert(
            args.output,
            clip=args.clip,
            dino=args.dino,
            official_dino=args.official_dino,
            official_aligner=args.official_aligner,
            preset=args.preset,
            image_embedding=args.image_embedding,
        )
    except (OSError, ValueError) as error:
        raise CLIError(ExitCode.INPUT, str(error)) from error
    print(f"AgriCLIP checkpoint written to {args.output}")
    return ExitCode.OK
