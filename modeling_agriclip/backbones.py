"""The stage-2 backbone families AgriCLIP supports: one `BackboneFamily` entry per transformers `model_type`.

Everything that differs between backbone families lives in its entry: how the model is built, how its pooled feature
is taken and how large it is, its tiny test layout, the published DINO crop and optimiser recipe stage 2 starts from,
and the modules LoRA adapts by default. Adding a family is adding one entry to `BACKBONE_FAMILIES`.

Hub custom code: imports only ``transformers``, so that ``trust_remote_code=True`` works for people who never
installed the package (`modeling_agriclip.py` and `configuration_agriclip.py` import it relatively, and
`custom_object_save` copies it into every saved folder with them).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from transformers import AutoModel, ConvNextConfig, Dinov2Config, PreTrainedConfig, ResNetConfig, ViTConfig


if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def cls_token(outputs) -> "torch.Tensor":
    """The CLS token of the final-layer-normalised sequence: the feature DINO trains and evaluates on a ViT."""
    return outputs.last_hidden_state[:, 0]


def pooler_output(outputs) -> "torch.Tensor":
    """The model's own pooled output, flattened to `(batch_size, features)` (ResNet: global average pool, shape
    `(B, C, 1, 1)`; ConvNeXt: layer norm of the global average pool, `(B, C)`)."""
    return outputs.pooler_output.flatten(1)


def hidden_size(config: PreTrainedConfig) -> int:
    return config.hidden_size


def last_hidden_size(config: PreTrainedConfig) -> int:
    """The width of the last stage of a convolutional network (`hidden_sizes[-1]`)."""
    return config.hidden_sizes[-1]


@dataclass(frozen=True)
class BackboneFamily:
    """What AgriCLIP needs to know about one family of stage-2 backbones (a transformers `model_type`).

    Args:
        model_type: the transformers `model_type` of the family's config (the registry key).
        pool: the pooled feature `(batch_size, feature_size)` from the model's output, what the aligner maps.
        feature_size: the size of that feature, read from the family's config.
        tiny: the family's tiny random layout at a given image size (`AgriCLIPConfig.tiny(backbone=model_type)`).
        model_kwargs: keyword arguments of `AutoModel.from_config` (ViT: no pooling layer, whose output AgriCLIP does
            not use).
        interpolate_pos_encoding: whether the model is told to interpolate its position embeddings on images of
            another size than `config.image_size` (ViT only asks; DINOv2 always interpolates; CNNs have none).
        crop_recipe: the DINO multi-crop scales stage 2 uses by default (a key of `training.dino.MULTICROP_PRESETS`).
        optimizer: the DINO optimiser recipe stage 2 uses by default (a key of
            `training.distillation.OPTIMIZER_RECIPES`).
        lora_targets: the regex of the backbone's modules that LoRA adapts by default, on module names inside the
            backbone (`training.lora` anchors it on `dino_model.`).
        returns_attentions: whether the model has attention layers whose weights `output_attentions=True` returns
            (ViT, DINOv2). A convolutional network (ResNet, ConvNeXt) has hidden states (one per stage) but no
            attentions: the model is not passed `output_attentions`, and its output's `attentions` stay None.
        no_split_modules: module class names that a `device_map` split must keep whole, beyond the model class's own
            `_no_split_modules` (ResNet lists only its conv layers and shortcut, but a residual block adds its
            shortcut to its layers' output, so the block must stay on one device).
    """

    model_type: str
    pool: Callable[[Any], "torch.Tensor"]
    feature_size: Callable[[PreTrainedConfig], int]
    tiny: Callable[[int], PreTrainedConfig]
    crop_recipe: str
    optimizer: str
    lora_targets: str
    model_kwargs: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    interpolate_pos_encoding: bool = False
    returns_attentions: bool = False
    no_split_modules: tuple[str, ...] = ()

    def build(self, config: PreTrainedConfig) -> "PreTrainedModel":
        """A randomly initialised backbone of `config` (as `AgriCLIPModel` builds its `dino_model`)."""
        return AutoModel.from_config(config, **self.model_kwargs)

    def outputs(
        self,
        backbone: "PreTrainedModel",
        pixel_values: "torch.Tensor",
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ):
        """The model output of `backbone` on `pixel_values` (a `ModelOutput`), with its hidden states and, for a
        family with attention layers, its attentions where asked (`output_attentions` is ignored by a family that
        `returns_attentions` is False for)."""
        kwargs = {"return_dict": True}
        image_size = getattr(backbone.config, "image_size", None)
        if (
            self.interpolate_pos_encoding
            and image_size is not None
            and tuple(pixel_values.shape[-2:]) != _pair(image_size)
        ):
            kwargs["interpolate_pos_encoding"] = True
        if output_hidden_states is not None:
            kwargs["output_hidden_states"] = output_hidden_states
        if output_attentions is not None and self.returns_attentions:
            kwargs["output_attentions"] = output_attentions
        return backbone(pixel_values=pixel_values, **kwargs)

    def features(self, backbone: "PreTrainedModel", pixel_values: "torch.Tensor") -> "torch.Tensor":
        """The pooled features `(batch_size, feature_size)` of `backbone` on `pixel_values`."""
        return self.pool(self.outputs(backbone, pixel_values))


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


# Attention projections of a transformers 5 ViT (`layers.N.attention.*`) or DINOv2 (`encoder.layer.N.attention.*`).
ATTENTION_PROJECTIONS = r".*\.attention\.(q_proj|k_proj|v_proj|o_proj)"

BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    family.model_type: family
    for family in (
        # DINO ViT (`facebook/dino-vit*`): the published ViT recipe (AdamW; global crops 0.4-1).
        BackboneFamily(
            model_type="vit",
            pool=cls_token,
            feature_size=hidden_size,
            tiny=lambda image_size: ViTConfig(
                image_size=image_size,
                patch_size=8,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=96,
                qkv_bias=True,
            ),
            crop_recipe="vit",
            optimizer="adamw",
            lora_targets=ATTENTION_PROJECTIONS,
            model_kwargs=MappingProxyType({"add_pooling_layer": False}),
            interpolate_pos_encoding=True,
            returns_attentions=True,
        ),
        # DINOv2 (`facebook/dinov2-*`): a ViT whose CLS token after the final layer norm is also its pooler output;
        # it interpolates its position embeddings by itself. Trained as a ViT.
        BackboneFamily(
            model_type="dinov2",
            pool=cls_token,
            feature_size=hidden_size,
            tiny=lambda image_size: Dinov2Config(
                image_size=image_size,
                patch_size=8,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=3,
                intermediate_size=96,
            ),
            crop_recipe="vit",
            optimizer="adamw",
            lora_targets=ATTENTION_PROJECTIONS,
            returns_attentions=True,
        ),
        # The paper's DINO ResNet-50: the published ResNet recipe (SGD; global crops 0.14-1). No attention: LoRA goes
        # on the convolutions of the residual blocks (PEFT's LoRA Conv2d), not the stem or the shortcuts.
        BackboneFamily(
            model_type="resnet",
            pool=pooler_output,
            feature_size=last_hidden_size,
            tiny=lambda image_size: ResNetConfig(
                layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], embedding_size=16
            ),
            crop_recipe="resnet",
            optimizer="sgd",
            lora_targets=r"encoder\.stages\.\d+\.layers\.\d+\.layer\.\d+\.convolution",
            no_split_modules=("ResNetBasicLayer", "ResNetBottleNeckLayer"),
        ),
        # ConvNeXt: pooled output is the final layer norm of the global average pool. DINO published no ConvNeXt
        # recipe; it gets the ViT one (AdamW, global crops 0.4-1), the recipe ConvNeXt was designed and is trained
        # under (its LayerNorm / GELU / layer-scale blocks follow the transformer recipe, AdamW, not ResNet's SGD).
        # LoRA goes on each block's pointwise (1x1, nn.Linear) layers pwconv1/pwconv2, its MLP, as on a ViT's
        # linear layers; not the depthwise 7x7 convolution nor the downsampling layers. The tiny layout has 3 stages,
        # so that stage 2's smallest local crops (3/7 of 64 px) keep a spatial extent through the stem and two
        # downsamplings.
        BackboneFamily(
            model_type="convnext",
            pool=pooler_output,
            feature_size=last_hidden_size,
            tiny=lambda image_size: ConvNextConfig(
                num_stages=3, depths=[1, 1, 1], hidden_sizes=[16, 32, 48], image_size=image_size
            ),
            crop_recipe="vit",
            optimizer="adamw",
            lora_targets=r"encoder\.stages\.\d+\.layers\.\d+\.(pwconv1|pwconv2)",
        ),
    )
}


def backbone_family(model_type: str | PreTrainedConfig) -> BackboneFamily:
    """The registry entry of a backbone `model_type` (or of a config's).

    Raises:
        ValueError: the model type is not a supported family; the message lists those that are.
    """
    if isinstance(model_type, PreTrainedConfig):
        model_type = model_type.model_type
    try:
        return BACKBONE_FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported stage-2 backbone model type {model_type!r}: AgriCLIP supports the backbone families "
            f"{sorted(BACKBONE_FAMILIES)} (modeling_agriclip.backbones.BACKBONE_FAMILIES; a new family is one "
            "BackboneFamily entry there)"
        ) from None


def backbone_features(backbone: "PreTrainedModel", pixel_values: "torch.Tensor") -> "torch.Tensor":
    """Pooled features of a transformers vision backbone of a supported family, shape `(batch_size, feature_size)`.

    Token models (ViT, DINOv2) give the final-layer-normalised CLS token, the feature DINO trains and evaluates;
    convolutional models give their pooled output (ResNet: global average pool; ConvNeXt: its layer norm).
    """
    return backbone_family(backbone.config).features(backbone, pixel_values)


__all__ = ["BACKBONE_FAMILIES", "BackboneFamily", "backbone_family", "backbone_features"]
