"""AgriCLIP as a transformers model: outputs, embedding modes, save/load, Auto classes, pipeline, remote code."""

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    CLIPTextConfig,
    pipeline,
)

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPProcessor
from modeling_agriclip.modeling_agriclip import clip_loss, sigmoid_loss

from conftest import run_subprocess


@pytest.fixture(scope="module")
def batch(tiny_processor, sample_images):
    return tiny_processor(
        text=["a leaf with rust", "a tilapia fish", "a jersey cow"], images=sample_images, return_tensors="pt"
    )


def test_forward_shapes_and_normalised_embeddings(tiny_model, batch):
    with torch.no_grad():
        out = tiny_model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (3, 3)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    expected = out.text_embeds @ out.image_embeds.t() * tiny_model.logit_scale.exp()
    torch.testing.assert_close(out.logits_per_text, expected)
    torch.testing.assert_close(out.loss, clip_loss(out.logits_per_text))


def test_clip_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.0]])
    rows = -(torch.log_softmax(logits, 1).diag()).mean()
    cols = -(torch.log_softmax(logits, 0).diag()).mean()
    torch.testing.assert_close(clip_loss(logits), (rows + cols) / 2)


def test_embedding_modes(tiny_model, batch):
    pixel_values = batch["pixel_values"]
    with torch.no_grad():
        clip = tiny_model.get_image_features(pixel_values, embedding="clip").pooler_output
        aligned = tiny_model.get_image_features(pixel_values, embedding="aligned").pooler_output
        fused = tiny_model.get_image_features(pixel_values, embedding="fused").pooler_output
        backbone = tiny_model.get_backbone_features(pixel_values).pooler_output
    assert backbone.shape == (3, tiny_model.config.backbone_hidden_size)
    torch.testing.assert_close(aligned, tiny_model.aligner(backbone))
    weight = tiny_model.config.fusion_weight
    torch.testing.assert_close(fused, weight * F.normalize(clip, dim=-1) + (1 - weight) * F.normalize(aligned, dim=-1))
    assert not torch.allclose(F.normalize(clip, dim=-1), F.normalize(aligned, dim=-1))
    with torch.no_grad():
        for mode, expected in [("clip", clip), ("aligned", aligned), ("fused", fused)]:
            out = tiny_model(**batch, image_embedding=mode)
            torch.testing.assert_close(out.image_embeds, F.normalize(expected, dim=-1))
    with pytest.raises(ValueError, match="embedding must be one of"):
        tiny_model.get_image_features(pixel_values, embedding="dino")


def test_pixel_renormalisation_feeds_clip_tower_its_own_normalisation(tiny_model, sample_images, tiny_processor):
    """The processor normalises with ImageNet statistics; the CLIP tower must see CLIP-normalised pixels."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pixel_values = tiny_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    mean_in, std_in = (
        torch.tensor(v).view(1, 3, 1, 1) for v in (tiny_model.config.image_mean, tiny_model.config.image_std)
    )
    raw = pixel_values * std_in + mean_in
    clip_normalised = (raw - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = tiny_model.visual_projection(tiny_model.vision_model(pixel_values=clip_normalised).pooler_output)
        torch.testing.assert_close(
            tiny_model.get_clip_image_features(pixel_values).pooler_output, expected, atol=1e-5, rtol=1e-5
        )


def test_long_prompt_is_truncated_with_eos(tiny_model, clip_tokenizer):
    long_ids = clip_tokenizer(["rust " * 120], return_tensors="pt").input_ids
    assert long_ids.shape[1] > 77
    truncated = clip_tokenizer(["rust " * 120], truncation=True, max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model.get_text_features(long_ids).pooler_output, tiny_model.get_text_features(truncated).pooler_output
        )


def test_save_and_load_round_trip(tiny_model, tiny_checkpoint, batch):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert {"configuration_agriclip.py", "modeling_agriclip.py", "processing_agriclip.py"} <= files
    auto_map = json.loads((tiny_checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForZeroShotImageClassification"}
    with torch.no_grad():
        expected = tiny_model(**batch)
        for loader in (AgriCLIPModel, AutoModel, AutoModelForZeroShotImageClassification):
            loaded = loader.from_pretrained(tiny_checkpoint).eval()
            assert isinstance(loaded, AgriCLIPModel)
            for mode in ("aligned", "clip", "fused"):
                torch.testing.assert_close(
                    loaded(**batch, image_embedding=mode).logits_per_image,
                    tiny_model(**batch, image_embedding=mode).logits_per_image,
                    rtol=0,
                    atol=0,
                )
            torch.testing.assert_close(loaded(**batch).logits_per_image, expected.logits_per_image, rtol=0, atol=0)
    assert isinstance(AutoConfig.from_pretrained(tiny_checkpoint), AgriCLIPConfig)


def test_auto_processor_returns_agriclip_processor(tiny_checkpoint, tiny_processor, sample_images):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert isinstance(processor, AgriCLIPProcessor)
    a = processor(text=["a cow"], images=sample_images[:1], return_tensors="pt")
    b = tiny_processor(text=["a cow"], images=sample_images[:1], return_tensors="pt")
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "pixel_values"}
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_processor_truncates_long_prompts(tiny_processor):
    ids = tiny_processor(text=["blight " * 200, "a leaf"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 77
    assert ids[0, -1].item() == tiny_processor.tokenizer.eos_token_id


def _check_pipeline_results(results, labels):
    assert [r["label"] for r in results] != [] and {r["label"] for r in results} == set(labels)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(torch.isfinite(torch.tensor(scores)))
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_zero_shot_pipeline(tiny_checkpoint, tiny_model, tiny_processor, sample_images):
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_checkpoint))
    labels = ["leaf rust", "healthy leaf", "fungal spots " * 40]
    single = classifier(sample_images[0], candidate_labels=labels, hypothesis_template="a photo of {}.")
    _check_pipeline_results(single, labels)
    batch = classifier(sample_images, candidate_labels=labels[:2])
    assert len(batch) == 3
    for results in batch:
        _check_pipeline_results(results, labels[:2])
    inputs = tiny_processor(
        text=[f"a photo of {label}." for label in labels], images=sample_images[:1], return_tensors="pt"
    )
    with torch.no_grad():
        direct = tiny_model(**inputs).logits_per_image[0].softmax(-1)
    by_label = {r["label"]: r["score"] for r in single}
    assert [by_label[label] for label in labels] == pytest.approx(direct.tolist(), abs=1e-5)


def test_remote_code_in_a_fresh_process(tiny_checkpoint, tmp_path):
    """Someone who never installed the package loads the folder with trust_remote_code=True."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".")]
        import numpy as np
        from PIL import Image
        from transformers import AutoModel, pipeline
        assert "modeling_agriclip" not in sys.modules
        try:
            AutoModel.from_pretrained({str(tiny_checkpoint)!r})
            raise SystemExit("loaded custom code without trust_remote_code")
        except ValueError as error:
            assert "trust_remote_code" in str(error)
        model = AutoModel.from_pretrained({str(tiny_checkpoint)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        classifier = pipeline("zero-shot-image-classification", model={str(tiny_checkpoint)!r}, trust_remote_code=True)
        image = Image.fromarray(np.zeros((70, 70, 3), dtype=np.uint8))
        result = classifier(image, candidate_labels=["leaf", "fish"])
        assert abs(sum(r["score"] for r in result) - 1) < 1e-5
        print("REMOTE-OK", type(model).__name__)
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = run_subprocess([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert "REMOTE-OK AgriCLIPModel" in done.stdout, done.stderr[-3000:]


def test_config_errors_name_the_problem(tiny_config):
    with pytest.raises(Exception, match="image_embedding must be one of"):
        AgriCLIPConfig(image_embedding="dino")
    as_dict = tiny_config.to_dict()
    del as_dict["dino_config"]
    with pytest.raises(ValueError, match="missing the sub-config.*dino_config"):
        AgriCLIPConfig.from_dict(as_dict)
    with pytest.raises(ValueError, match="model type 'clip'"):
        AgriCLIPConfig.from_dict({**tiny_config.to_dict(), "model_type": "clip"})
    with pytest.raises(Exception, match="hidden size"):
        AgriCLIPConfig(text_config=CLIPTextConfig(hidden_size=30, num_attention_heads=4))


def test_config_records_the_alignment_objective_and_fusion_weight_through_save_load_and_remote_code(tmp_path):
    folder = tmp_path / "model"
    AgriCLIPModel(AgriCLIPConfig.tiny(alignment_objective="contrastive", fusion_weight=0.3)).save_pretrained(folder)
    for loader in (AgriCLIPConfig, AutoConfig):
        loaded = loader.from_pretrained(folder)
        assert (loaded.alignment_objective, loaded.fusion_weight) == ("contrastive", 0.3)
    # A checkpoint written before the field existed loads as the paper's objective.
    saved = json.loads((folder / "config.json").read_text())
    del saved["alignment_objective"]
    assert AgriCLIPConfig.from_dict(saved).alignment_objective == "image-mse"
    with pytest.raises(
        Exception, match=r"alignment_objective must be one of \('image-mse', 'text-mse', 'contrastive'\)"
    ):
        AgriCLIPConfig.tiny(alignment_objective="mse")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".")]
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
        print("REMOTE", config.alignment_objective, config.fusion_weight)
        """
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = run_subprocess([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert "REMOTE contrastive 0.3" in done.stdout, done.stderr[-3000:]


def test_config_presets():
    assert AgriCLIPConfig.paper().backbone_hidden_size == 2048
    assert AgriCLIPConfig.paper().dino_config.model_type == "resnet"
    assert AgriCLIPConfig.vit_b16().backbone_hidden_size == 768
    resnet = AgriCLIPModel(AgriCLIPConfig.tiny(backbone="resnet")).eval()
    with torch.no_grad():
        assert resnet.get_backbone_features(torch.randn(2, 3, 64, 64)).pooler_output.shape == (2, 64)


def test_the_output_carries_the_logit_parameters_and_a_siglip_model_adds_its_bias(tiny_model, batch):
    with torch.no_grad():
        infonce = tiny_model(**batch, return_loss=True)
        lean = tiny_model(**batch, return_logits=False)
    assert tiny_model.config.contrastive_loss == "infonce"
    for out in (infonce, lean):
        assert out.logit_scale is tiny_model.logit_scale and out.logit_bias is tiny_model.logit_bias
    assert tiny_model.logit_bias.shape == () and tiny_model.logit_bias.item() == pytest.approx(-10.0)
    torch.manual_seed(0)
    siglip = AgriCLIPModel(AgriCLIPConfig.tiny(contrastive_loss="siglip", logit_bias_init_value=-3.0)).eval()
    with torch.no_grad():
        out = siglip(**batch, return_loss=True)
    assert out.logit_bias.item() == pytest.approx(-3.0)
    expected = out.text_embeds @ out.image_embeds.t() * siglip.logit_scale.exp() - 3.0
    torch.testing.assert_close(out.logits_per_text, expected)
    torch.testing.assert_close(out.logits_per_image, expected.t())
    torch.testing.assert_close(out.loss, sigmoid_loss(out.logits_per_text))
    signs = 2 * torch.eye(3) - 1
    torch.testing.assert_close(out.loss, -F.logsigmoid(signs * expected).sum() / 3)
    with pytest.raises(Exception, match=r"contrastive_loss must be one of \('infonce', 'siglip'\)"):
        AgriCLIPConfig.tiny(contrastive_loss="clip")


def test_a_checkpoint_saved_before_logit_bias_existed_loads_with_the_initial_bias(
    tiny_model, tiny_processor, batch, tmp_path
):
    from safetensors.torch import load_file, save_file

    from modeling_agriclip.zero_shot import ZeroShotClassifier

    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["logit_bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("logit_bias_init_value", "contrastive_loss"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded, info = AgriCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.contrastive_loss == "infonce" and loaded.logit_bias.item() == pytest.approx(-10.0)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(**batch).logits_per_image, tiny_model(**batch).logits_per_image, rtol=0, atol=0
        )
    # The classifier, which refuses a checkpoint with missing tensors, loads it too.
    assert ZeroShotClassifier.from_pretrained(tmp_path).logit_bias == 0.0
