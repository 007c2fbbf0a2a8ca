"""PyTorch AgriCLIP model.

Hub custom code: imports only ``torch``, ``transformers`` and its siblings ``configuration_agriclip`` and ``backbones``, so that
``trust_remote_code=True`` works for people who never installed the package.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import load_state_dict
from transformers.utils import ModelOutput

from .backbones import backbone_family, backbone_features
from .configuration_agriclip import AgriCLIPConfig


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of a square similarity matrix against its diagonal."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the text-to-image and image-to-text cross-entropies, as in CLIP."""
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2.0


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) of a square matrix of logits `t * cos + b` whose diagonal
    holds the matching pairs: `-1/n * sum_ij log sigmoid(z_ij * logits_ij)`, z_ij = 1 on the diagonal, -1 elsewhere.
    Symmetric in its two directions (the transpose gives the same value)."""
    signs = 2.0 * torch.eye(len(logits_per_text), device=logits_per_text.device, dtype=logits_per_text.dtype) - 1.0
    return -F.logsigmoid(signs * logits_per_text).sum() / len(logits_per_text)


def fuse_image_embeddings(clip_embeds: torch.Tensor, aligned_embeds: torch.Tensor, weight: float) -> torch.Tensor:
    """The `"fused"` image embedding: `weight` times the L2-normalised CLIP one plus `1 - weight` times the
    L2-normalised aligned one (not normalised itself)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion_weight must lie in [0, 1], got {weight}")
    return weight * F.normalize(clip_embeds, dim=-1) + (1.0 - weight) * F.normalize(aligned_embeds, dim=-1)


def _unreadable_weight_files(folder: Path) -> list[str]:
    """The safetensors files of a folder whose header is unreadable or whose data does not cover it (truncated)."""
    unreadable = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            load_state_dict(path, map_location="meta")  # reads the header only
        except Exception:
            unreadable.append(str(path))
    return unreadable


@contextmanager
def unreadable_weights_named(pretrained_model_name_or_path, subfolder: str = ""):
    """Around a `from_pretrained` of any model: a failure caused by a truncated or corrupt safetensors file of a
    local folder is re-raised as an OSError naming that file, which safetensors' own message does not. Other
    failures pass through unchanged."""
    try:
        yield
    except Exception as error:
        folder = Path(pretrained_model_name_or_path or "", subfolder)
        unreadable = _unreadable_weight_files(folder) if pretrained_model_name_or_path and folder.is_dir() else []
        if not unreadable:
            raise
        raise OSError(
            f"{', '.join(unreadable)}: truncated or corrupt weights file, cannot be loaded ({error})"
        ) from error


class PixelRenormalization(nn.Module):
    """Re-normalises pixel values per channel: from `(x - source_mean) / source_std` to `(x - target_mean) / target_std`.

    Lets one image processor feed two image towers trained with different normalisations. The affine map is held
    in non-persistent buffers rebuilt from the config in `_init_weights` (they are not in the checkpoint).
    """

    def __init__(self, source_mean, source_std, target_mean, target_std):
        super().__init__()
        self.is_identity = list(source_mean) == list(target_mean) and list(source_std) == list(target_std)
        scale, shift = self.affine_map(source_mean, source_std, target_mean, target_std)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        self._source_target = (source_mean, source_std, target_mean, target_std)

    @staticmethod
    def affine_map(source_mean, source_std, target_mean, target_std) -> tuple[torch.Tensor, torch.Tensor]:
        source_mean, source_std, target_mean, target_std = (
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
            for v in (source_mean, source_std, target_mean, target_std)
        )
        return source_std / target_std, (source_mean - target_mean) / target_std

    def reset_buffers(self) -> None:
        scale, shift = self.affine_map(*self._source_target)
        init.copy_(self.scale, scale)
        init.copy_(self.shift, shift)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return pixel_values
        return pixel_values * self.scale.to(pixel_values.dtype) + self.shift.to(pixel_values.dtype)


@dataclass
class AgriCLIPOutput(ModelOutput):
    r"""
    Output of [`AgriCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            The image-text contrastive loss over the batch that `config.contrastive_loss` names: CLIP's symmetric
            InfoNCE, or SigLIP's sigmoid loss.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities between `image_embeds` and `text_embeds` (what the zero-shot pipeline reads):
            `exp(logit_scale) * cos`, plus `logit_bias` for a `contrastive_loss="siglip"` model. The pipeline
            softmaxes them over the candidate labels, which the bias does not change (same ranking and scores).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised image embeddings from the source that `config.image_embedding` selects.
        logit_scale (`torch.FloatTensor` of shape `()`):
            The model's learnable log temperature (the `logit_scale` parameter itself, with its gradient; logits
            multiply cosines by its exponential). Returned so a loss over a larger batch (stage 1 gathers the
            embeddings of every process) reads it from the output.
        logit_bias (`torch.FloatTensor` of shape `()`):
            The model's learnable logit bias (the `logit_bias` parameter itself), added to the logits of a
            `contrastive_loss="siglip"` model only.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None


class AgriCLIPPreTrainedModel(PreTrainedModel):
    config: AgriCLIPConfig
    base_model_prefix = "agriclip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Checkpoints saved before the SigLIP bias existed: it is initialised from `config.logit_bias_init_value`.
    _keys_to_ignore_on_load_missing = [r"(^|\.)logit_bias$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, whose error names the weights file when one in a local folder is truncated
        or corrupt (see `unreadable_weights_named`)."""
        with unreadable_weights_named(pretrained_model_name_or_path, kwargs.get("subfolder", "")):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        # Runs after the children (post-order), so these override the generic Linear initialisation.
        if isinstance(module, AgriCLIPModel):
            config = self.config
            init.normal_(module.text_projection.weight, std=config.text_config.hidden_size**-0.5)
            init.normal_(module.visual_projection.weight, std=config.vision_config.hidden_size**-0.5)
            init.normal_(module.aligner.weight, std=config.backbone_hidden_size**-0.5)
            init.zeros_(module.aligner.bias)
            init.constant_(module.logit_scale, config.logit_scale_init_value)
            init.constant_(module.logit_bias, config.logit_bias_init_value)
        elif isinstance(module, PixelRenormalization):
            # Non-persistent buffers come back from the meta device uninitialised after `from_pretrained`.
            module.reset_buffers()


class AgriCLIPModel(AgriCLIPPreTrainedModel):
    r"""
    AgriCLIP: a CLIP dual encoder (text tower `text_model` + `text_projection`, image tower `vision_model` +
    `visual_projection`; attribute names as in transformers' `CLIPModel`, so CLIP weights load 1:1) plus a
    fine-grained backbone `dino_model` whose pooled features the linear `aligner` maps into the same embedding space.
    """

    def __init__(self, config: AgriCLIPConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.dino_model = backbone_family(config.dino_config).build(config.dino_config)
        self.aligner = nn.Linear(config.backbone_hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        self.clip_pixel_renorm = PixelRenormalization(
            config.image_mean, config.image_std, config.clip_image_mean, config.clip_image_std
        )
        self.dino_pixel_renorm = PixelRenormalization(
            config.image_mean, config.image_std, config.dino_image_mean, config.dino_image_std
        )
        self.post_init()

    def _fit_text_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """Cuts prompts longer than the text tower's context and ends each cut row with EOS, where CLIP pools.

        The zero-shot pipeline pads without truncating, so a long label must not raise.
        """
        context = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] <= context:
            return input_ids, attention_mask
        eos = self.config.text_config.eos_token_id
        if attention_mask is not None:
            overflowing = attention_mask[:, context:].any(dim=1)
            attention_mask = attention_mask[:, :context]
        else:
            overflowing = ~(input_ids[:, :context] == eos).any(dim=1)
        input_ids = input_ids[:, :context].clone()
        input_ids[overflowing, -1] = eos
        return input_ids, attention_mask

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """Projected text embeddings `(batch_size, projection_dim)`, not normalised."""
        input_ids, attention_mask = self._fit_text_context(input_ids, attention_mask)
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.text_projection(outputs.pooler_output)

    def get_clip_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Projected embeddings of the CLIP image tower `(batch_size, projection_dim)`, not normalised."""
        pixel_values = self.clip_pixel_renorm(pixel_values.to(self.visual_projection.weight.dtype))
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_backbone_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Pooled backbone features before the aligner `(batch_size, config.backbone_hidden_size)`."""
        pixel_values = self.dino_pixel_renorm(pixel_values.to(self.aligner.weight.dtype))
        return backbone_features(self.dino_model, pixel_values)

    def get_image_features(
        self, pixel_values: torch.FloatTensor, embedding: str | None = None, fusion_weight: float | None = None
    ) -> torch.FloatTensor:
        """Image embeddings `(batch_size, projection_dim)` from the source `embedding` (default `config.image_embedding`).

        `"clip"` and `"aligned"` are not normalised; `"fused"` is the weighted sum of the two L2-normalised embeddings,
        `fusion_weight` (default `config.fusion_weight`) times the CLIP one: a call can weigh them otherwise without
        changing the config that other callers share.
        """
        embedding = embedding or self.config.image_embedding
        if fusion_weight is not None and embedding != "fused":
            raise ValueError(f"fusion_weight applies to the 'fused' image embedding, not to {embedding!r}")
        if embedding == "clip":
            return self.get_clip_image_features(pixel_values)
        if embedding == "aligned":
            return self.aligner(self.get_backbone_features(pixel_values))
        if embedding == "fused":
            weight = self.config.fusion_weight if fusion_weight is None else fusion_weight
            return fuse_image_embeddings(
                self.get_clip_image_features(pixel_values),
                self.aligner(self.get_backbone_features(pixel_values)),
                weight,
            )
        raise ValueError(f"embedding must be one of 'aligned', 'clip', 'fused', got {embedding!r}")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        image_embedding: str | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> AgriCLIPOutput:
        r"""
        Args:
            return_loss (`bool`, *optional*):
                Whether to return the contrastive loss of `config.contrastive_loss` on this batch (requires as many
                texts as images).
            image_embedding (`str`, *optional*):
                Overrides `config.image_embedding` for this call.
            return_logits (`bool`, *optional*, defaults to `True`):
                Whether to compute `logits_per_image` and `logits_per_text`. A caller that only reads the embeddings
                (stage 1 computes its loss on the gathered global batch) skips the similarity matrix; they are then
                `None` unless `return_loss` needs them.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("AgriCLIPModel.forward needs both input_ids and pixel_values")
        image_embeds = F.normalize(self.get_image_features(pixel_values, image_embedding), dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask, position_ids), dim=-1)
        parameters = {"logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
        if not (return_logits or return_loss):
            return AgriCLIPOutput(text_embeds=text_embeds, image_embeds=image_embeds, **parameters)
        sigmoid = self.config.contrastive_loss == "siglip"
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        if sigmoid:
            logits_per_text = logits_per_text + self.logit_bias
        loss = None
        if return_loss:
            loss = sigmoid_loss(logits_per_text) if sigmoid else clip_loss(logits_per_text)
        return AgriCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            **parameters,
        )


__all__ = [
    "AgriCLIPModel",
    "AgriCLIPOutput",
    "AgriCLIPPreTrainedModel",
    "backbone_features",
    "clip_loss",
    "fuse_image_embeddings",
    "sigmoid_loss",
    "unreadable_weights_named",
]
