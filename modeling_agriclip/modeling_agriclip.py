"""PyTorch AgriCLIP model.

Hub custom code: imports only ``torch``, ``transformers`` (and ``huggingface_hub`` through it) and its siblings
``configuration_agriclip`` and ``backbones``, so that ``trust_remote_code=True`` works for people who never installed
the package.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import load_state_dict
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

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
        text_model_output (`BaseModelOutputWithPooling`):
            The output of the CLIP text tower `text_model`, as `get_text_features` returns it: `pooler_output` is the
            projected text embedding (before normalisation, as in transformers 5's `CLIPOutput`), `last_hidden_state`
            the final-layer-normalised token states, and `hidden_states` (embeddings plus one per layer, each
            `(text_batch_size, sequence_length, hidden_size)`) and `attentions` (one per layer, each
            `(text_batch_size, num_heads, sequence_length, sequence_length)`) where `output_hidden_states` /
            `output_attentions` asked for them.
        vision_model_output (`BaseModelOutputWithPooling`, *optional*):
            The output of the CLIP image tower `vision_model`, as `get_clip_image_features` returns it
            (`pooler_output`: the projected CLIP image embedding), when the image embedding uses it (`"clip"`,
            `"fused"`); None for `"aligned"`, which does not run that tower.
        backbone_model_output (`ModelOutput`, *optional*):
            The output of the backbone `dino_model` (its own output class: `BaseModelOutputWithPooling` for ViT and
            DINOv2, `BaseModelOutputWithPoolingAndNoAttention` for ResNet and ConvNeXt) when the image embedding
            uses it (`"aligned"`, `"fused"`); None for `"clip"`. `pooler_output` is the aligned embedding (the pooled
            feature through the `aligner`, before normalisation). `hidden_states` and `attentions` where asked for;
            a ResNet or ConvNeXt backbone has hidden states (the stem output and one per stage) but no attention
            layers, so its `attentions` stay None.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    backbone_model_output: ModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in order; the tower outputs as tuples themselves (as transformers' CLIP)."""
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@dataclass
class AgriCLIPFusedImageOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`AgriCLIPModel.get_image_features`] for the `"fused"` image embedding, which two towers make.

    Args:
        pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            The fused image embedding: `fusion_weight` times the L2-normalised CLIP embedding plus `1 - fusion_weight`
            times the L2-normalised aligned one (not normalised itself).
        last_hidden_state, hidden_states, attentions:
            None: each tower's are in its own output below.
        vision_model_output (`BaseModelOutputWithPooling`):
            The CLIP image tower's output (`pooler_output`: the projected CLIP image embedding).
        backbone_model_output (`ModelOutput`):
            The backbone's output (`pooler_output`: the aligned embedding).
    """

    vision_model_output: BaseModelOutputWithPooling | None = None
    backbone_model_output: ModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


# transformers' `create_and_tag_model_card` (what `push_to_hub` writes when the repo has no card yet) says this.
_GENERIC_CARD_SENTENCE = "This model card has been automatically generated."


def minimal_model_card(repo_id: str, config: AgriCLIPConfig, tags=()) -> ModelCard:
    """A short, truthful card for an AgriCLIP checkpoint pushed with `push_to_hub`, in place of transformers' generic
    template: the pipeline it serves and how to load it, and that it does not record how the model was made (the
    project's `agriclip card` builds the full card from the run's records)."""
    tags = list(dict.fromkeys(["custom_code", "agriclip", *tags]))
    data = ModelCardData(library_name="transformers", pipeline_tag="zero-shot-image-classification", tags=tags)
    backbone = config.dino_config.model_type
    content = f"""---
{data.to_yaml()}
---

# {repo_id}

An AgriCLIP checkpoint: a CLIP text tower and image tower, and a `{backbone}` image backbone whose features a linear
aligner maps into the CLIP embedding space, for zero-shot image classification in agriculture. Zero-shot uses the
`{config.image_embedding}` image embedding.

This card was written by `push_to_hub`, which knows only the model's configuration: it does not say what data the
model was trained on, how, or how well it does. The full card (training data, stages, evaluation results) is built
from the training run with `agriclip card <checkpoint folder> --repo-id {repo_id} ...` and published with
`agriclip publish`.

## How to use

```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo_id}", trust_remote_code=True)
classifier("leaf.jpg", candidate_labels=["a photo of a healthy leaf", "a photo of a leaf with rust"])
```

`trust_remote_code=True` runs the model code shipped in this repository (`modeling_agriclip.py` and its siblings);
with the `agriclip` package installed, `import modeling_agriclip` registers the classes and it is not needed.
"""
    return ModelCard(content)


class AgriCLIPPreTrainedModel(PreTrainedModel):
    config: AgriCLIPConfig
    base_model_prefix = "agriclip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    # Gradient checkpointing covers the CLIP towers and a ViT/DINOv2 backbone; a ResNet or ConvNeXt backbone has no
    # checkpointable layers in transformers and runs as usual.
    supports_gradient_checkpointing = True
    # Every attention layer (the CLIP towers, a ViT/DINOv2 backbone) dispatches through transformers' attention
    # interface; a ResNet or ConvNeXt backbone has none and stays "eager". `output_attentions=True` needs "eager"
    # on the towers it reads (see `AgriCLIPModel.forward`).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # The CLIP towers' blocks; each instance adds its backbone's (its model class's own `_no_split_modules`, merged
    # by `post_init`, plus the family's `BackboneFamily.no_split_modules`), so a `device_map` split never cuts one.
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Checkpoints saved before the SigLIP bias existed: it is initialised from `config.logit_bias_init_value`.
    _keys_to_ignore_on_load_missing = [r"(^|\.)logit_bias$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, whose error names the weights file when one in a local folder is truncated
        or corrupt (see `unreadable_weights_named`)."""
        with unreadable_weights_named(pretrained_model_name_or_path, kwargs.get("subfolder", "")):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs):
        """`PreTrainedModel.set_attn_implementation`, except that a backbone without attention layers (ResNet,
        ConvNeXt) stays "eager" when one implementation is named for the whole model (as `AgriCLIPConfig` does at
        load time): transformers would otherwise refuse "sdpa" or flex attention because the backbone has none."""
        if isinstance(attn_implementation, str) and not backbone_family(self.config.dino_config).returns_attentions:
            attn_implementation = {
                "": attn_implementation,
                "text_config": attn_implementation,
                "vision_config": attn_implementation,
                "dino_config": "eager",
            }
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, files_timestamps, *args, **kwargs):
        """Before `push_to_hub` (or `save_pretrained(push_to_hub=True)`) uploads: a README that is transformers'
        generic template ("Model Card for Model ID", written when the repo has no card yet) is replaced by
        `minimal_model_card`, keeping its tags. A card the repo already has (such as the one `agriclip publish`
        uploads) is left as it is."""
        readme = Path(working_dir) / "README.md"
        if readme.is_file() and _GENERIC_CARD_SENTENCE in readme.read_text(encoding="utf-8"):
            tags = ModelCard.load(readme).data.tags or []
            minimal_model_card(repo_id, self.config, tags).save(readme)
        return super()._upload_modified_files(working_dir, repo_id, files_timestamps, *args, **kwargs)

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

    The `get_*_features` methods follow transformers 5's `CLIPModel`: each returns the tower's output, a
    `BaseModelOutputWithPooling` (or the backbone's own output class), whose `pooler_output` holds the embedding;
    code written for `CLIPModel` (`model.get_text_features(**inputs).pooler_output`) runs unchanged. With
    `return_dict=False` they, and `forward`, return `output.to_tuple()`.
    """

    def __init__(self, config: AgriCLIPConfig):
        super().__init__(config)
        family = backbone_family(config.dino_config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.dino_model = family.build(config.dino_config)
        self.aligner = nn.Linear(config.backbone_hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        self.clip_pixel_renorm = PixelRenormalization(
            config.image_mean, config.image_std, config.clip_image_mean, config.clip_image_std
        )
        self.dino_pixel_renorm = PixelRenormalization(
            config.image_mean, config.image_std, config.dino_image_mean, config.dino_image_std
        )
        # `post_init` adds the towers' own `_no_split_modules` to these.
        self._no_split_modules = [*AgriCLIPPreTrainedModel._no_split_modules, *family.no_split_modules]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding (what `resize_token_embeddings` resizes when new tokens, such as
        disease names, are added to the tokenizer)."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.set_input_embeddings(value)

    def _output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None) -> dict[str, bool]:
        """`output_attentions` / `output_hidden_states` for the towers: the call's, else this model's config's."""
        return {
            "output_attentions": bool(
                self.config.output_attentions if output_attentions is None else output_attentions
            ),
            "output_hidden_states": bool(
                self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
        }

    def _require_eager_attention(self, flags: dict[str, bool], *towers: str) -> None:
        """`output_attentions=True` reads the attention weights of `towers`, which only the "eager" implementation
        returns (SDPA, flash and flex attention return none, or not the weights): fails, naming the fix, on a tower
        that runs another."""
        if not flags["output_attentions"]:
            return
        for name in towers:
            tower = getattr(self, name)
            if name == "dino_model" and not backbone_family(tower.config).returns_attentions:
                continue  # a convolutional backbone: no attention layers, nothing to return
            implementation = tower.config._attn_implementation
            if implementation != "eager":
                raise ValueError(
                    f"output_attentions=True needs eager attention, but {name} runs {implementation!r} attention, "
                    "which returns no attention weights. Load the model with "
                    "`from_pretrained(..., attn_implementation='eager')` or call "
                    "`model.set_attn_implementation('eager')` first."
                )

    def _image_embedding_choice(self, embedding: str | None, fusion_weight: float | None) -> str:
        embedding = embedding or self.config.image_embedding
        if fusion_weight is not None and embedding != "fused":
            raise ValueError(f"fusion_weight applies to the 'fused' image embedding, not to {embedding!r}")
        if embedding not in ("aligned", "clip", "fused"):
            raise ValueError(f"embedding must be one of 'aligned', 'clip', 'fused', got {embedding!r}")
        return embedding

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

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """The text tower's output, as transformers 5's `CLIPModel.get_text_features`: `pooler_output` is the
        projected text embedding `(batch_size, projection_dim)`, not normalised; `last_hidden_state` the
        final-layer-normalised token states; `hidden_states` / `attentions` where asked for (attentions need eager
        attention). `return_dict=False` returns it as a tuple."""
        flags = self._output_flags(output_attentions, output_hidden_states)
        self._require_eager_attention(flags, "text_model")
        input_ids, attention_mask = self._fit_text_context(input_ids, attention_mask)
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **flags
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def _clip_image_outputs(
        self, pixel_values: torch.FloatTensor, flags: dict[str, bool]
    ) -> BaseModelOutputWithPooling:
        pixel_values = self.clip_pixel_renorm(pixel_values.to(self.visual_projection.weight.dtype))
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **flags)
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    def _backbone_outputs(self, pixel_values: torch.FloatTensor, flags: dict[str, bool]) -> ModelOutput:
        pixel_values = self.dino_pixel_renorm(pixel_values.to(self.aligner.weight.dtype))
        family = backbone_family(self.dino_model.config)
        outputs = family.outputs(self.dino_model, pixel_values, **flags)
        # Rebuilt rather than assigned: a ViT without pooling layer has no `pooler_output` key to update in place.
        return type(outputs)(**{**outputs, "pooler_output": family.pool(outputs)})

    @can_return_tuple
    def get_clip_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """The CLIP image tower's output, as transformers 5's `CLIPModel.get_image_features`: `pooler_output` is the
        projected CLIP image embedding `(batch_size, projection_dim)`, not normalised; `hidden_states` /
        `attentions` where asked for (attentions need eager attention)."""
        flags = self._output_flags(output_attentions, output_hidden_states)
        self._require_eager_attention(flags, "vision_model")
        return self._clip_image_outputs(pixel_values, flags)

    @can_return_tuple
    def get_backbone_features(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> ModelOutput:
        """The backbone's output (its own output class: `BaseModelOutputWithPooling` for ViT/DINOv2,
        `BaseModelOutputWithPoolingAndNoAttention` for ResNet/ConvNeXt) whose `pooler_output` is the pooled feature
        before the aligner `(batch_size, config.backbone_hidden_size)` (a ViT's final-layer-normalised CLS token, a
        CNN's pooled output); `hidden_states` / `attentions` where asked for. A ResNet or ConvNeXt backbone has
        hidden states but no attentions (None)."""
        flags = self._output_flags(output_attentions, output_hidden_states)
        self._require_eager_attention(flags, "dino_model")
        return self._backbone_outputs(pixel_values, flags)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        embedding: str | None = None,
        fusion_weight: float | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """The image embedding from the source `embedding` (default `config.image_embedding`), as transformers 5's
        `CLIPModel.get_image_features`: a `BaseModelOutputWithPooling` whose `pooler_output` is the embedding
        `(batch_size, projection_dim)`.

        - `"clip"`: the CLIP image tower's output (`get_clip_image_features`), not normalised.
        - `"aligned"`: the backbone's output with `pooler_output` the aligned embedding (the pooled feature through
          the aligner), not normalised.
        - `"fused"`: an `AgriCLIPFusedImageOutput` whose `pooler_output` is the weighted sum of the two
          L2-normalised embeddings, `fusion_weight` (default `config.fusion_weight`) times the CLIP one (a call can
          weigh them otherwise without changing the config that other callers share), with both towers' outputs.

        `hidden_states` / `attentions` of the towers used where asked for (attentions need eager attention).
        """
        embedding = self._image_embedding_choice(embedding, fusion_weight)
        flags = self._output_flags(output_attentions, output_hidden_states)
        towers = {"clip": ("vision_model",), "aligned": ("dino_model",), "fused": ("vision_model", "dino_model")}
        self._require_eager_attention(flags, *towers[embedding])
        vision_outputs = backbone_outputs = None
        if embedding in ("clip", "fused"):
            vision_outputs = self._clip_image_outputs(pixel_values, flags)
        if embedding in ("aligned", "fused"):
            backbone_outputs = self._backbone_outputs(pixel_values, flags)
            backbone_outputs.pooler_output = self.aligner(backbone_outputs.pooler_output)
        if embedding == "clip":
            return vision_outputs
        if embedding == "aligned":
            return backbone_outputs
        weight = self.config.fusion_weight if fusion_weight is None else fusion_weight
        fused = fuse_image_embeddings(
            vision_outputs.pooler_output,
            backbone_outputs.pooler_output.to(vision_outputs.pooler_output.device),
            weight,
        )
        return AgriCLIPFusedImageOutput(
            pooler_output=fused, vision_model_output=vision_outputs, backbone_model_output=backbone_outputs
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        image_embedding: str | None = None,
        return_logits: bool = True,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
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
            output_attentions (`bool`, *optional*):
                Whether to return the attention weights of every tower that runs, in `text_model_output`,
                `vision_model_output` and `backbone_model_output` (default `config.output_attentions`). They need
                the "eager" attention implementation (load with `attn_implementation="eager"` or call
                `set_attn_implementation("eager")`); with SDPA, flash or flex attention this raises a ValueError.
                A ResNet or ConvNeXt backbone has no attention layers: its `attentions` stay None.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of every tower that runs (default
                `config.output_hidden_states`).
            return_dict (`bool`, *optional*):
                `False` returns `output.to_tuple()` (tower outputs as nested tuples), as transformers models do.

        Other keyword arguments are accepted and ignored.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("AgriCLIPModel.forward needs both input_ids and pixel_values")
        embedding = self._image_embedding_choice(image_embedding, None)
        flags = self._output_flags(output_attentions, output_hidden_states)
        image_outputs = self.get_image_features(pixel_values, embedding, return_dict=True, **flags)
        text_outputs = self.get_text_features(input_ids, attention_mask, position_ids, return_dict=True, **flags)
        if embedding == "fused":
            vision_outputs, backbone_outputs = image_outputs.vision_model_output, image_outputs.backbone_model_output
        else:
            vision_outputs = image_outputs if embedding == "clip" else None
            backbone_outputs = image_outputs if embedding == "aligned" else None
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        image_embeds = F.normalize(image_outputs.pooler_output, dim=-1).to(text_embeds.device)
        parameters = {"logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
        tower_outputs = {
            "text_model_output": text_outputs,
            "vision_model_output": vision_outputs,
            "backbone_model_output": backbone_outputs,
        }
        if not (return_logits or return_loss):
            return AgriCLIPOutput(text_embeds=text_embeds, image_embeds=image_embeds, **parameters, **tower_outputs)
        sigmoid = self.config.contrastive_loss == "siglip"
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp().to(text_embeds.device)
        if sigmoid:
            logits_per_text = logits_per_text + self.logit_bias.to(text_embeds.device)
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
            **tower_outputs,
        )


__all__ = [
    "AgriCLIPFusedImageOutput",
    "AgriCLIPModel",
    "AgriCLIPOutput",
    "AgriCLIPPreTrainedModel",
    "backbone_features",
    "clip_loss",
    "fuse_image_embeddings",
    "minimal_model_card",
    "sigmoid_loss",
    "unreadable_weights_named",
]
