"""The default LoRA targets of each tower of an AgriCLIP model, as regexes PEFT full-matches against module names.

Here, below training and the model card, because both need them: `training.lora` adapts these modules, and the model
card says which ones a practitioner's adapter targets by default. Not Hub code (no saved model imports it).
"""

from __future__ import annotations

from .backbones import backbone_family


# The CLIP towers' attention projections; the backbone's targets come from its family (`BackboneFamily.lora_targets`:
# attention projections of a ViT or DINOv2, the block convolutions of a ResNet, the pointwise layers of a ConvNeXt).
ATTENTION_TARGETS = {
    "text": r"text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "image": r"vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
}


def default_target_modules(config, towers) -> str:
    """The regex of the default LoRA targets of `towers` ("text", "image", "backbone") of a model of `config`: the
    CLIP towers' attention projections, and the backbone family's targets (`modeling_agriclip.backbones`) anchored on
    `dino_model.`."""
    patterns = [
        rf"dino_model\.(?:{backbone_family(config.dino_config).lora_targets})"
        if tower == "backbone"
        else ATTENTION_TARGETS[tower]
        for tower in towers
    ]
    return "|".join(f"(?:{pattern})" for pattern in patterns)
