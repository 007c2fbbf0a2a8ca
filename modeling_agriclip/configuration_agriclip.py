"""AgriCLIP model configuration.

Hub custom code: imports only ``transformers`` (and ``huggingface_hub`` through it) and its sibling ``backbones``, so that
``trust_remote_code=True`` works for people who never installed the package.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedConfig, ResNetConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .backbones import backbone_family


IMAGE_EMBEDDINGS = ("aligned", "clip", "fused")
# What stage 3 fitted the aligner to (`training.aligner.ALIGNMENT_OBJECTIVES`, which a test checks against this).
ALIGNMENT_OBJECTIVES = ("image-mse", "text-mse", "contrastive")
# How stage 1 trained the towers, and so how their logits read: "infonce" (CLIP's softmax over the batch, no bias) or
# "siglip" (SigLIP's per-pair sigmoid with `logit_bias`). Each names an entry of `training.loss_table.CONTRASTIVE_LOSSES`
# whose class records it (a test checks both ways); other losses of that table record one of these.
CONTRASTIVE_LOSSES = ("infonce", "siglip")
SUB_CONFIGS = ("text_config", "vision_config", "dino_config")

# The CLIP BPE tokenizer's special tokens (modeling_agriclip.tokenizer); CLIPTextConfig's own pad default (1) differs.
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407


@strict
class AgriCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of an [`AgriCLIPModel`]: a CLIP text tower, a CLIP image tower (trained in stage 1), and a
    fine-grained image backbone (trained with DINO in stage 2) whose features a linear aligner maps into the CLIP
    embedding space (stage 3).

    Args:
        text_config (`dict` or `CLIPTextConfig`):
            The CLIP text tower.
        vision_config (`dict` or `CLIPVisionConfig`):
            The CLIP image tower. Its `image_size` is the processor's crop size.
        dino_config (`dict` or `PreTrainedConfig`):
            The stage-2 backbone: a transformers vision model of a supported family, resolved from `model_type`
            (`vit` and `dinov2` for DINO ViT weights, `resnet` for the paper's DINO ResNet-50, `convnext`; the
            families are `backbones.BACKBONE_FAMILIES`, and another model type fails here, listing them).
        projection_dim (`int`, defaults to 512):
            Dimension of the shared image-text embedding space.
        logit_scale_init_value (`float`, defaults to 2.6592):
            Initial log temperature (ln(1/0.07), as CLIP).
        logit_bias_init_value (`float`, defaults to -10.0):
            Initial `logit_bias`, the learnable bias b of SigLIP's sigmoid loss (Zhai et al. 2023 initialise it at
            -10). Every model holds the parameter; only a `contrastive_loss="siglip"` model adds it to its logits. A
            checkpoint saved before the parameter existed loads with it set to this value.
        contrastive_loss (`str`, defaults to `"infonce"`):
            The objective stage 1 trained the CLIP towers with, which says how their logits read: `"infonce"`
            (CLIP's symmetric softmax cross-entropy; logits are `exp(logit_scale) * cos`, probabilities a softmax over
            the candidate texts) or `"siglip"` (SigLIP's pairwise sigmoid loss; logits are
            `exp(logit_scale) * cos + logit_bias`, each a log-odds of its own, probabilities per-label sigmoids).
        image_embedding (`str`, defaults to `"aligned"`):
            Which image embedding zero-shot classification compares with text: `"aligned"` (backbone features through
            the aligner, the paper's AgriCLIP), `"clip"` (the CLIP image tower, stage 1 alone) or `"fused"`
            (`fusion_weight * clip + (1 - fusion_weight) * aligned`, both L2-normalised first).
        fusion_weight (`float`, defaults to 0.5):
            Weight of the CLIP image embedding in the `"fused"` mode (stage 3 writes the weight it chose on validation
            pairs of the pretraining data).
        alignment_objective (`str`, defaults to `"image-mse"`):
            What stage 3 fitted the aligner to: `"image-mse"` (least squares onto the CLIP image embedding, the paper),
            `"text-mse"` (least squares onto the CLIP text embeddings of each image's captions) or `"contrastive"`
            (InfoNCE against those text embeddings, started from the `"text-mse"` solution). A record only: every
            objective maps into the same embedding space, and zero-shot uses the aligner the same way.
        image_mean, image_std (`list[float]`):
            The normalisation the processor applies to `pixel_values` (ImageNet by default, as the paper's backbone).
        clip_image_mean, clip_image_std, dino_image_mean, dino_image_std (`list[float]`):
            The normalisation each image tower was trained with. Where it differs from `image_mean`/`image_std`, the
            model converts `pixel_values` in-model with a per-channel affine map, so one image processor serves both.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialiser of weights not covered by a sub-model's own scheme.
    """

    model_type = "agriclip"
    sub_configs_defaults = {
        "text_config": CLIPTextConfig,
        "vision_config": CLIPVisionConfig,
        "dino_config": SubConfigSpec(AutoConfig, model_type="resnet"),
    }

    text_config: dict | CLIPTextConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    dino_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float = -10.0
    contrastive_loss: str = "infonce"
    image_embedding: str = "aligned"
    fusion_weight: float = 0.5
    alignment_objective: str = "image-mse"
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    clip_image_mean: list[float] | None = None
    clip_image_std: list[float] | None = None
    dino_image_mean: list[float] | None = None
    dino_image_std: list[float] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.image_mean = list(self.image_mean or IMAGENET_DEFAULT_MEAN)
        self.image_std = list(self.image_std or IMAGENET_DEFAULT_STD)
        self.clip_image_mean = list(self.clip_image_mean or OPENAI_CLIP_MEAN)
        self.clip_image_std = list(self.clip_image_std or OPENAI_CLIP_STD)
        self.dino_image_mean = list(self.dino_image_mean or IMAGENET_DEFAULT_MEAN)
        self.dino_image_std = list(self.dino_image_std or IMAGENET_DEFAULT_STD)
        super().__post_init__(**kwargs)
        # A saved folder serves both auto classes through remote code; `custom_object_save` adds the other entries.
        self.auto_map = {
            "AutoModelForZeroShotImageClassification": "modeling_agriclip.AgriCLIPModel",
            **(getattr(self, "auto_map", None) or {}),
        }

    def validate_architecture(self):
        """Part of the `@strict` validation: fails early, naming the field, on settings the model cannot honour."""
        if self.image_embedding not in IMAGE_EMBEDDINGS:
            raise ValueError(f"image_embedding must be one of {IMAGE_EMBEDDINGS}, got {self.image_embedding!r}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must lie in [0, 1], got {self.fusion_weight}")
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive_loss must be one of {CONTRASTIVE_LOSSES}, got {self.contrastive_loss!r}")
        if self.alignment_objective not in ALIGNMENT_OBJECTIVES:
            raise ValueError(
                f"alignment_objective must be one of {ALIGNMENT_OBJECTIVES}, got {self.alignment_objective!r}"
            )
        for name in (
            "image_mean",
            "image_std",
            "clip_image_mean",
            "clip_image_std",
            "dino_image_mean",
            "dino_image_std",
        ):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must hold 3 per-channel values, got {getattr(self, name)}")
        self.backbone_hidden_size  # raises on a backbone whose feature size cannot be read

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if config_dict.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(
                f"This is a config of model type {config_dict['model_type']!r}, not {cls.model_type!r}: "
                "load it with its own class or AutoConfig"
            )
        missing = [name for name in SUB_CONFIGS if config_dict.get(name) is None]
        if missing:
            raise ValueError(
                f"The AgriCLIP config is missing the sub-config(s) {missing}; a saved config names all of {SUB_CONFIGS}"
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None):
        """As `PreTrainedConfig`'s (set on this config and recursively on the sub-configs), except that a backbone
        without attention layers (ResNet, ConvNeXt) stays "eager": it has no attention to implement, and transformers
        would otherwise refuse a plain `attn_implementation="sdpa"` (or flex, flash) for the whole model, though the
        CLIP towers support it."""
        PreTrainedConfig._attn_implementation.fset(self, value)
        dino_config = getattr(self, "dino_config", None)
        if isinstance(dino_config, PreTrainedConfig) and not backbone_family(dino_config).returns_attentions:
            dino_config._attn_implementation_internal = "eager"

    @property
    def backbone_hidden_size(self) -> int:
        """Size of the pooled backbone feature that the aligner maps (e.g. 2048 for ResNet-50, 768 for ViT-B), as the
        backbone's family reads it from `dino_config` (`backbones.BACKBONE_FAMILIES`; an unsupported family raises a
        ValueError listing the supported ones)."""
        return backbone_family(self.dino_config).feature_size(self.dino_config)

    @classmethod
    def paper(cls, **kwargs) -> "AgriCLIPConfig":
        """The paper's layout: CLIP ViT-B/16 text and image towers, DINO ResNet-50 backbone, aligner 2048 -> 512."""
        return cls(
            text_config=_clip_text(),
            vision_config=CLIPVisionConfig(patch_size=16, projection_dim=512),
            dino_config=ResNetConfig(
                layer_type="bottleneck",
                depths=[3, 4, 6, 3],
                hidden_sizes=[256, 512, 1024, 2048],
                embedding_size=64,
                downsample_in_bottleneck=False,
            ),
            **kwargs,
        )

    @classmethod
    def vit_b16(cls, **kwargs) -> "AgriCLIPConfig":
        """CLIP ViT-B/16 towers with a DINO ViT-B/16 backbone (`facebook/dino-vitb16`), aligner 768 -> 512."""
        return cls(
            text_config=_clip_text(),
            vision_config=CLIPVisionConfig(patch_size=16, projection_dim=512),
            dino_config=ViTConfig(image_size=224, patch_size=16, qkv_bias=True),
            **kwargs,
        )

    @classmethod
    def tiny(cls, backbone: str = "vit", image_size: int = 64, **kwargs) -> "AgriCLIPConfig":
        """A few-hundred-thousand-parameter layout (plus the real 49,408-token embedding) for tests and the CPU demo.

        `backbone` is the `model_type` of a backbone family of `backbones.BACKBONE_FAMILIES` (`"vit"`, `"dinov2"`,
        `"resnet"`, `"convnext"`), whose tiny layout it takes.
        """
        dino_config = backbone_family(backbone).tiny(image_size)
        return cls(
            text_config=_clip_text(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
            ),
            vision_config=CLIPVisionConfig(
                image_size=image_size,
                patch_size=16,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=32,
            ),
            dino_config=dino_config,
            projection_dim=32,
            **kwargs,
        )


def _clip_text(**kwargs) -> CLIPTextConfig:
    """A CLIP text config whose special-token ids match the real CLIP BPE tokenizer."""
    return CLIPTextConfig(
        bos_token_id=CLIP_BOS_TOKEN_ID, eos_token_id=CLIP_EOS_TOKEN_ID, pad_token_id=CLIP_EOS_TOKEN_ID, **kwargs
    )
