"""The stage-2 backbone registry: every family is one `BackboneFamily` entry, and ConvNeXt and DINOv2 work end to end
(features, save/load, LoRA targets, the stage-2 recipe and a short stage-2 run)."""

import re
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, ConvNextModel, Dinov2Model, SwinConfig, SwinModel

import training.distillation
from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel
from modeling_agriclip.backbones import BACKBONE_FAMILIES, backbone_family, backbone_features
from modeling_agriclip.convert import PRESETS, convert
from training.dino import MULTICROP_PRESETS
from training.distillation import OPTIMIZER_RECIPES, resolve_recipe
from training.lora import build_lora_model, resolve_lora_targets
from training.options import options_from
from training.stage2_dino import DinoOptions, build_parser
from training.stage2_dino import main as stage2_main

from conftest import run_subprocess


UNSUPPORTED = r"unsupported stage-2 backbone model type 'swin'.*\['convnext', 'dinov2', 'resnet', 'vit'\]"


def _standalone_pooled(kind, backbone, pixel_values):
    """The pooled feature as transformers' own model gives it, computed here without the registry: DINOv2's CLS
    token after the final layer norm (its pooler output), ConvNeXt's pooler output (layer norm of the global average
    pool)."""
    outputs = backbone(pixel_values=pixel_values)
    if kind == "dinov2":
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0], rtol=0, atol=0)
        return outputs.last_hidden_state[:, 0]
    return outputs.pooler_output


def test_every_family_is_one_consistent_entry():
    assert sorted(BACKBONE_FAMILIES) == ["convnext", "dinov2", "resnet", "vit"]
    for name, family in BACKBONE_FAMILIES.items():
        config = AgriCLIPConfig.tiny(backbone=name)
        assert family.model_type == name == config.dino_config.model_type
        assert backbone_family(config.dino_config) is family
        assert family.crop_recipe in MULTICROP_PRESETS and family.optimizer in OPTIMIZER_RECIPES
        assert PRESETS["tiny" if name == "vit" else f"tiny_{name}"]().dino_config.model_type == name
        model = AgriCLIPModel(config).eval()
        with torch.no_grad():  # the global size and stage 2's smallest local crops (3/7 of it)
            for side in (64, 27):
                features = model.get_backbone_features(torch.randn(2, 3, side, side)).pooler_output
                assert features.shape == (2, config.backbone_hidden_size), (name, side)
    # The published recipes as before, and the new families' choices (ConvNeXt trains as ViTs do: AdamW).
    assert {name: (f.crop_recipe, f.optimizer) for name, f in BACKBONE_FAMILIES.items()} == {
        "vit": ("vit", "adamw"),
        "dinov2": ("vit", "adamw"),
        "resnet": ("resnet", "sgd"),
        "convnext": ("vit", "adamw"),
    }


@pytest.mark.parametrize("kind", ["convnext", "dinov2"])
def test_features_equal_the_standalone_model_s_pooled_output_before_and_after_save_load(kind, tmp_path):
    torch.manual_seed(4)
    standalone_class = {"convnext": ConvNextModel, "dinov2": Dinov2Model}[kind]
    standalone = standalone_class(AgriCLIPConfig.tiny(backbone=kind).dino_config).eval()
    standalone.save_pretrained(tmp_path / "backbone")
    model, _ = convert(clip=None, dino=str(tmp_path / "backbone"), preset="tiny")
    assert model.config.dino_config.model_type == kind
    model.save_pretrained(tmp_path / "agriclip")
    reloaded = AgriCLIPModel.from_pretrained(tmp_path / "agriclip").eval()
    assert (tmp_path / "agriclip" / "backbones.py").is_file()  # the Hub code the model file imports travels with it
    with torch.no_grad():
        for side in (64, 48):  # DINOv2 interpolates its position embeddings by itself
            pixel_values = torch.randn(2, 3, side, side)
            expected = _standalone_pooled(kind, standalone, pixel_values)
            for candidate in (model, reloaded):
                torch.testing.assert_close(
                    candidate.get_backbone_features(pixel_values).pooler_output, expected, rtol=0, atol=1e-6
                )


def test_a_convnext_checkpoint_loads_through_remote_code_with_the_same_features(tmp_path):
    """Someone who never installed the package: the registry is Hub code that travels with the saved folder."""
    torch.manual_seed(5)
    model = AgriCLIPModel(AgriCLIPConfig.tiny(backbone="convnext")).eval()
    model.save_pretrained(tmp_path / "model")
    pixel_values = torch.randn(2, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(model.get_backbone_features(pixel_values).pooler_output, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".")]
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "modeling_agriclip" not in sys.modules
        with torch.no_grad():
            features = model.get_backbone_features(torch.load({str(tmp_path / "pixels.pt")!r})).pooler_output
        print("REMOTE", (features - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item())
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = run_subprocess([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert "REMOTE 0.0" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("kind", ["convnext", "dinov2"])
def test_default_lora_targets_are_the_family_s_modules_and_peft_wraps_them(kind):
    model = AgriCLIPModel(AgriCLIPConfig.tiny(backbone=kind))
    modules = dict(model.named_modules())
    _, matched = resolve_lora_targets(model, ["backbone"])
    if kind == "convnext":
        # Each block's pointwise layers, in every stage; not the depthwise convolution nor the downsampling.
        expected = {
            f"dino_model.encoder.stages.{stage}.layers.0.{name}"
            for stage in range(3)
            for name in ("pwconv1", "pwconv2")
        }
    else:
        expected = {
            f"dino_model.encoder.layer.{layer}.attention.{name}"
            for layer in range(2)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
    assert set(matched) == expected
    assert all(isinstance(modules[name], torch.nn.Linear) for name in matched)
    peft_model = build_lora_model(model, ["backbone"])
    wrapped = dict(peft_model.get_base_model().named_modules())
    assert all(hasattr(wrapped[name], "lora_A") for name in matched)
    lora = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert lora and all(name.startswith("base_model.model.dino_model.") for name in lora)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    with torch.no_grad():
        features = peft_model.get_base_model().get_backbone_features(torch.randn(1, 3, 64, 64)).pooler_output
        assert features.shape == (1, 48)


@pytest.mark.parametrize("kind", sorted(BACKBONE_FAMILIES))
def test_stage2_fills_the_family_s_recipe(kind):
    required = {"model": "tiny", "train_data": "data", "output_dir": "out"}
    unset = options_from(DinoOptions, required, "stage2")
    args = resolve_recipe(unset, kind)
    family = BACKBONE_FAMILIES[kind]
    assert (args.crop_recipe, args.optimizer) == (family.crop_recipe, family.optimizer)
    assert args.learning_rate == OPTIMIZER_RECIPES[family.optimizer]["learning_rate"]
    assert unset.optimizer is None and unset.learning_rate is None  # a pure function: the given options stay
    given = options_from(
        DinoOptions, {**required, "crop_recipe": "resnet", "optimizer": "sgd", "learning_rate": 0.1}, "stage2"
    )
    given = resolve_recipe(given, kind)  # flags win over the family's recipe
    assert (given.crop_recipe, given.optimizer, given.learning_rate) == ("resnet", "sgd", 0.1)


def test_the_stage2_flags_offer_the_recipes_the_families_name():
    """The light stage-2 script (its --help loads no torch) spells the recipe names out; they are those that exist."""
    choices = {action.dest: action.choices for action in build_parser()._actions}
    assert sorted(choices["crop_recipe"]) == sorted(MULTICROP_PRESETS)
    assert sorted(choices["optimizer"]) == sorted(OPTIMIZER_RECIPES)


def test_a_short_stage2_run_on_a_convnext_backbone(caption_folder, tmp_path, monkeypatch):
    resolved = []

    def recording(args, backbone_type):
        args = resolve_recipe(args, backbone_type)
        resolved.append((backbone_type, args.crop_recipe, args.optimizer))
        return args

    monkeypatch.setattr(training.distillation, "resolve_recipe", recording)
    final = stage2_main(
        [
            "--model",
            "tiny_convnext",
            "--train-data",
            str(caption_folder),
            "--output-dir",
            str(tmp_path),
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--out-dim",
            "64",
            "--head-hidden-dim",
            "32",
            "--head-bottleneck-dim",
            "16",
            "--num-local-crops",
            "2",
            "--warmup-epochs",
            "1",
            "--log-with",
            "none",
        ]
    )
    assert resolved == [("convnext", "vit", "adamw")]
    standalone = AutoModel.from_pretrained(tmp_path / "backbone")
    assert isinstance(standalone, ConvNextModel)
    inside = AgriCLIPModel.from_pretrained(final).dino_model.state_dict()
    assert standalone.state_dict().keys() == inside.keys()
    assert all(torch.equal(standalone.state_dict()[k], inside[k]) for k in inside)
    torch.manual_seed(0)
    initial = AgriCLIPModel(AgriCLIPConfig.tiny(backbone="convnext")).dino_model.state_dict()
    assert any(not torch.equal(initial[k], inside[k]) for k in inside)


def test_an_unsupported_backbone_fails_where_first_needed_listing_the_families(tmp_path):
    swin = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2)
    with pytest.raises(ValueError, match=UNSUPPORTED):
        backbone_family("swin")
    with pytest.raises(Exception, match=UNSUPPORTED):
        AgriCLIPConfig(dino_config=swin)
    with pytest.raises(ValueError, match=UNSUPPORTED):
        AgriCLIPConfig.tiny(backbone="swin")
    with pytest.raises(ValueError, match=UNSUPPORTED):
        backbone_features(SwinModel(swin), torch.randn(1, 3, 32, 32))
    SwinModel(swin).save_pretrained(tmp_path / "swin")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "swin")) + ": " + UNSUPPORTED):
        convert(clip=None, dino=str(tmp_path / "swin"), preset="tiny")
    with pytest.raises(ValueError, match=UNSUPPORTED):
        resolve_recipe(options_from(DinoOptions, {"model": "tiny", "train_data": "d", "output_dir": "o"}, "s"), "swin")
