"""The transformers model contract of AgriCLIPModel, in the style of transformers' ModelTesterMixin, on tiny configs of
every backbone family: save/load, dtypes, attention implementations (SDPA, flex, eager) and `output_attentions`,
hidden states, `return_dict=False`, gradient checkpointing, `device_map` (and what a split may not cut), token
embedding resizing, code written for transformers' CLIPModel, and the card `push_to_hub` writes."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import infer_auto_device_map
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModel, CLIPTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import is_flash_attn_2_available

from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel, AgriCLIPOutput
from modeling_agriclip.backbones import BACKBONE_FAMILIES, backbone_family
from modeling_agriclip.modeling_agriclip import AgriCLIPFusedImageOutput


BACKBONES = sorted(BACKBONE_FAMILIES)  # convnext, dinov2, resnet, vit
TOWER_OUTPUTS = ("text_model_output", "vision_model_output", "backbone_model_output")


def tiny(backbone: str, **kwargs) -> AgriCLIPModel:
    torch.manual_seed(0)
    return AgriCLIPModel(AgriCLIPConfig.tiny(backbone=backbone, image_embedding="fused", **kwargs)).eval()


@pytest.fixture(scope="module")
def inputs(clip_tokenizer):
    """Two captions of different lengths (padded) and two images: a batch `return_loss` accepts."""
    text = clip_tokenizer(["a leaf with rust", "a healthy wheat leaf in the field"], padding=True, return_tensors="pt")
    torch.manual_seed(1)
    return {**text, "pixel_values": torch.randn(2, 3, 64, 64)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """backbone -> a folder with the tiny fused-embedding model of that backbone saved in it."""
    root = tmp_path_factory.mktemp("contract")
    folders = {}
    for backbone in BACKBONES:
        folders[backbone] = root / backbone
        tiny(backbone).save_pretrained(folders[backbone])
    return folders


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits_per_image


# ---------------------------------------------------------------------------------------------------------------------
# Save / load, dtype, device_map
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_save_load_round_trip_gives_the_same_weights_and_outputs(backbone, saved, inputs):
    model = tiny(backbone)
    reloaded = AutoModel.from_pretrained(saved[backbone]).eval()
    assert type(reloaded) is AgriCLIPModel
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    # The non-persistent renormalisation buffers come back from the meta device rebuilt, not as garbage.
    torch.testing.assert_close(reloaded.clip_pixel_renorm.scale, model.clip_pixel_renorm.scale)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_load_has_that_dtype_and_runs_on_cpu(backbone, dtype, saved, inputs):
    reference = logits(AgriCLIPModel.from_pretrained(saved[backbone]).eval(), inputs)
    model = AgriCLIPModel.from_pretrained(saved[backbone], dtype=dtype).eval()
    assert model.dtype == dtype
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        output = model(**inputs)  # float32 pixel_values, as a caller holds them: the model casts
    assert output.logits_per_image.dtype == dtype and torch.isfinite(output.logits_per_image).all()
    scale = model.logit_scale.exp().float()
    torch.testing.assert_close(output.logits_per_image.float() / scale, reference / scale, rtol=0, atol=0.05)


def test_the_deprecated_torch_dtype_keyword_still_loads_that_dtype(saved):
    assert AgriCLIPModel.from_pretrained(saved["resnet"], torch_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_a_device_map_load_works(device_map, saved, inputs):
    reference = logits(AgriCLIPModel.from_pretrained(saved["vit"]).eval(), inputs)
    model = AgriCLIPModel.from_pretrained(saved["vit"], device_map=device_map).eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(model, inputs), reference, rtol=0, atol=1e-6)


def _device_of(device_map: dict, name: str):
    while name not in device_map:
        name = name.rpartition(".")[0]
    return device_map[name]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_device_map_split_cuts_through_a_backbone_block(backbone):
    model = tiny(backbone)
    own = set(type(model.dino_model)._no_split_modules)
    extra = set(backbone_family(backbone).no_split_modules)
    assert own | extra | {"CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"} <= model._no_split_modules
    present = {type(module).__name__ for module in model.modules()}
    if backbone == "resnet":
        # A residual block adds its shortcut to its layers' output: it must stay on one device, though ResNetModel
        # lists only its conv layers and shortcut.
        assert {"ResNetBasicLayer", "ResNetBottleNeckLayer"} <= model._no_split_modules
        assert "ResNetBasicLayer" in present
    # Budgets that put part of the model on disk, fine enough to cut the backbone at every place a split may.
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    backbone_split = 0
    for step in range(120):
        budget = {"cpu": int(total * (0.85 + 0.15 * step / 120)), "disk": 10 * total}
        device_map = infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=list(model._no_split_modules)
        )
        backbone_split += any(key.startswith("dino_model.") for key in device_map)
        for name, module in model.named_modules():
            if type(module).__name__ in model._no_split_modules:
                devices = {_device_of(device_map, f"{name}.{p}") for p, _ in module.named_parameters()}
                assert len(devices) <= 1, (name, devices)
    assert backbone_split, "no budget split the backbone: the check saw nothing"


# ---------------------------------------------------------------------------------------------------------------------
# Attention implementations, output_attentions, output_hidden_states
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_sdpa_and_eager_attention_give_the_same_logits(backbone, saved, inputs):
    sdpa = AgriCLIPModel.from_pretrained(saved[backbone], attn_implementation="sdpa").eval()
    eager = AgriCLIPModel.from_pretrained(saved[backbone], attn_implementation="eager").eval()
    has_attention = backbone_family(backbone).returns_attentions
    # A plain "sdpa" is honoured by every tower with attention; a CNN backbone has none and stays "eager".
    assert sdpa.text_model.config._attn_implementation == sdpa.vision_model.config._attn_implementation == "sdpa"
    assert sdpa.dino_model.config._attn_implementation == ("sdpa" if has_attention else "eager")
    assert AgriCLIPModel.from_pretrained(saved[backbone]).text_model.config._attn_implementation == "sdpa"  # default
    assert {m.config._attn_implementation for m in (eager.text_model, eager.vision_model, eager.dino_model)} == {
        "eager"
    }
    torch.testing.assert_close(logits(sdpa, inputs), logits(eager, inputs), rtol=0, atol=1e-5)
    # Switching at run time, with one implementation named for the whole model, works for every family too.
    sdpa.set_attn_implementation("eager")
    torch.testing.assert_close(logits(sdpa, inputs), logits(eager, inputs), rtol=0, atol=1e-6)
    eager.set_attn_implementation("sdpa")
    assert eager.dino_model.config._attn_implementation == ("sdpa" if has_attention else "eager")


# torch compiles flex attention's kernels on first use: about 50 s on a CPU.
@pytest.mark.slow
def test_flex_attention_gives_the_same_logits_as_eager(saved, inputs):
    flex = AgriCLIPModel.from_pretrained(saved["dinov2"], attn_implementation="flex_attention").eval()
    eager = AgriCLIPModel.from_pretrained(saved["dinov2"], attn_implementation="eager").eval()
    assert {m.config._attn_implementation for m in (flex.text_model, flex.vision_model, flex.dino_model)} == {
        "flex_attention"
    }
    torch.testing.assert_close(logits(flex, inputs), logits(eager, inputs), rtol=0, atol=1e-5)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and is_flash_attn_2_available()), reason="needs a GPU and flash-attn"
)
def test_flash_attention_gives_the_same_logits_as_eager(saved, inputs):
    kwargs = {"dtype": torch.bfloat16, "device_map": "cuda"}
    flash = AgriCLIPModel.from_pretrained(saved["vit"], attn_implementation="flash_attention_2", **kwargs).eval()
    eager = AgriCLIPModel.from_pretrained(saved["vit"], attn_implementation="eager", **kwargs).eval()
    on_gpu = {key: value.cuda() for key, value in inputs.items()}
    torch.testing.assert_close(logits(flash, on_gpu).float(), logits(eager, on_gpu).float(), rtol=0, atol=0.1)


def _sequence(outputs, key):
    return [tuple(t.shape) for t in outputs[key]]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_attentions_and_hidden_states_of_every_tower(backbone, saved, inputs):
    model = AgriCLIPModel.from_pretrained(saved[backbone], attn_implementation="eager").eval()
    config = model.config
    with torch.no_grad():
        output = model(**inputs, output_attentions=True, output_hidden_states=True)
    batch, length = inputs["input_ids"].shape
    text, vision, dino = (output[key] for key in TOWER_OUTPUTS)
    assert isinstance(text, BaseModelOutputWithPooling) and isinstance(vision, BaseModelOutputWithPooling)

    t = config.text_config
    assert _sequence(text, "hidden_states") == [(batch, length, t.hidden_size)] * (t.num_hidden_layers + 1)
    assert _sequence(text, "attentions") == [(batch, t.num_attention_heads, length, length)] * t.num_hidden_layers
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    assert _sequence(vision, "hidden_states") == [(batch, patches, v.hidden_size)] * (v.num_hidden_layers + 1)
    assert _sequence(vision, "attentions") == [(batch, v.num_attention_heads, patches, patches)] * v.num_hidden_layers

    d = config.dino_config
    if backbone_family(backbone).returns_attentions:
        tokens = (d.image_size // d.patch_size) ** 2 + 1
        assert _sequence(dino, "hidden_states") == [(batch, tokens, d.hidden_size)] * (d.num_hidden_layers + 1)
        assert _sequence(dino, "attentions") == [(batch, d.num_attention_heads, tokens, tokens)] * d.num_hidden_layers
        # What an explanation reads: the last layer's CLS attention over the patches, one row per head.
        cls_attention = dino.attentions[-1][:, :, 0, 1:]
        torch.testing.assert_close(dino.attentions[-1].sum(-1), torch.ones(batch, d.num_attention_heads, tokens))
        assert cls_attention.shape == (batch, d.num_attention_heads, tokens - 1)
    else:
        # A CNN: the stem output and one feature map per stage, and no attention layers.
        stages = len(d.hidden_sizes)
        assert len(dino.hidden_states) == stages + 1
        assert [h.shape[1] for h in dino.hidden_states[1:]] == list(d.hidden_sizes)
        assert dino.get("attentions") is None

    # The tower outputs carry the embeddings in the shared space (as transformers 5's CLIPOutput).
    torch.testing.assert_close(F.normalize(text.pooler_output, dim=-1), output.text_embeds)
    weight = config.fusion_weight
    fused = weight * F.normalize(vision.pooler_output, dim=-1) + (1 - weight) * F.normalize(dino.pooler_output, dim=-1)
    torch.testing.assert_close(F.normalize(fused, dim=-1), output.image_embeds)
    # Not asked: no hidden states or attentions anywhere.
    with torch.no_grad():
        plain = model(**inputs)
    assert all(
        plain[key].get("hidden_states") is None and plain[key].get("attentions") is None for key in TOWER_OUTPUTS
    )


def test_each_image_embedding_returns_the_tower_outputs_it_uses(inputs):
    model = tiny("vit")
    with torch.no_grad():
        outputs = {mode: model(**inputs, image_embedding=mode) for mode in ("aligned", "clip", "fused")}
    assert outputs["aligned"].vision_model_output is None and outputs["aligned"].backbone_model_output is not None
    assert outputs["clip"].vision_model_output is not None and outputs["clip"].backbone_model_output is None
    assert all(outputs["fused"][key] is not None for key in TOWER_OUTPUTS)
    assert all(output.text_model_output is not None for output in outputs.values())


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_output_attentions_under_sdpa_is_a_clear_error_not_a_silent_none(backbone, saved, inputs):
    model = AgriCLIPModel.from_pretrained(saved[backbone]).eval()  # the default: SDPA
    with pytest.raises(ValueError, match=r"output_attentions=True needs eager attention.*attn_implementation='eager'"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="text_model runs 'sdpa'"):
        model.get_text_features(inputs["input_ids"], output_attentions=True)
    with torch.no_grad():  # hidden states need no particular implementation
        assert model(**inputs, output_hidden_states=True).text_model_output.hidden_states is not None


def test_the_config_output_flags_are_the_defaults(saved, inputs):
    model = AgriCLIPModel.from_pretrained(saved["vit"], attn_implementation="eager", output_attentions=True).eval()
    model.config.output_hidden_states = True
    with torch.no_grad():
        output = model(**inputs)
        assert output.backbone_model_output.attentions is not None and output.text_model_output.hidden_states
        explicit = model(**inputs, output_attentions=False, output_hidden_states=False)
    assert explicit.backbone_model_output.get("attentions") is None
    assert explicit.text_model_output.get("hidden_states") is None


# ---------------------------------------------------------------------------------------------------------------------
# return_dict=False
# ---------------------------------------------------------------------------------------------------------------------


def _assert_same_nested(expected, actual):
    assert type(expected) is type(actual)
    if isinstance(expected, tuple):
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual):
            _assert_same_nested(e, a)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_return_dict_false_returns_to_tuple(backbone, saved, inputs):
    model = AgriCLIPModel.from_pretrained(saved[backbone], attn_implementation="eager").eval()
    flags = {"return_loss": True, "output_attentions": True, "output_hidden_states": True}
    with torch.no_grad():
        output = model(**inputs, **flags)
        as_tuple = model(**inputs, **flags, return_dict=False)
    assert isinstance(output, AgriCLIPOutput) and isinstance(as_tuple, tuple)
    _assert_same_nested(output.to_tuple(), as_tuple)
    # Field order: loss first, then the logits; the tower outputs are nested tuples at the end.
    torch.testing.assert_close(as_tuple[0], output.loss)
    torch.testing.assert_close(as_tuple[1], output.logits_per_image)
    assert isinstance(as_tuple[-1], tuple) and isinstance(as_tuple[-3], tuple)
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], return_dict=False)
        image = model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(text, tuple) and isinstance(image, tuple)
    torch.testing.assert_close(text[1], output.text_model_output.pooler_output)  # (last_hidden_state, pooler_output)
    # config.return_dict=False: tuples without asking, as transformers models do.
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**inputs), tuple)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backbone, inputs):
    model = tiny(backbone).train()
    calls = []

    def loss_and_gradients():
        model.zero_grad()
        calls.clear()
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    # Count the layers that run through the checkpoint function: every CLIP layer, and a ViT backbone's.
    layers = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False)]
    for layer in layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, checkpoint=checkpoint, **kw: (
            calls.append(1) or checkpoint(*args, **kw)
        )
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    clip_layers = model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    backbone_layers = model.config.dino_config.num_hidden_layers if backbone == "vit" else 0
    assert len(calls) == clip_layers + backbone_layers
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=1e-6)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    assert any(name.startswith("dino_model.") for name in plain_gradients)
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-6, msg=name)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


# ---------------------------------------------------------------------------------------------------------------------
# Code written for transformers' CLIPModel; input embeddings and new tokens
# ---------------------------------------------------------------------------------------------------------------------


def clip_style_embeddings(model, processor, texts, images):
    """Code written for transformers 5's CLIPModel, unchanged."""
    with torch.no_grad():
        text_features = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True))
        image_features = model.get_image_features(**processor(images=images, return_tensors="pt"))
        output = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
    return text_features.pooler_output, image_features.pooler_output, output


@pytest.mark.parametrize("which", ["clip", "agriclip"])
def test_code_written_for_clipmodel_runs_unchanged(
    which, tiny_clip_baseline, tiny_model, tiny_processor, sample_images
):
    model, processor = tiny_clip_baseline if which == "clip" else (tiny_model, tiny_processor)
    texts = ["a photo of a wheat leaf", "a photo of a rice plant with blast"]
    text, image, output = clip_style_embeddings(model, processor, texts, sample_images)
    assert text.shape[0] == 2 and image.shape[0] == len(sample_images)
    torch.testing.assert_close(F.normalize(text, dim=-1), output.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.normalize(image, dim=-1), output.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.text_model_output.pooler_output, text, rtol=1e-5, atol=1e-5)


def test_every_features_method_returns_a_model_output_with_the_embedding(tiny_model, inputs):
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        text = tiny_model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        clip = tiny_model.get_clip_image_features(pixel_values)
        backbone = tiny_model.get_backbone_features(pixel_values)
        aligned = tiny_model.get_image_features(pixel_values, embedding="aligned")
        fused = tiny_model.get_image_features(pixel_values, embedding="fused")
    projection = tiny_model.config.projection_dim
    assert text.pooler_output.shape == clip.pooler_output.shape == aligned.pooler_output.shape == (2, projection)
    assert backbone.pooler_output.shape == (2, tiny_model.config.backbone_hidden_size)
    torch.testing.assert_close(aligned.pooler_output, tiny_model.aligner(backbone.pooler_output))
    assert isinstance(fused, AgriCLIPFusedImageOutput) and isinstance(fused, BaseModelOutputWithPooling)
    torch.testing.assert_close(fused.vision_model_output.pooler_output, clip.pooler_output)
    torch.testing.assert_close(fused.backbone_model_output.pooler_output, aligned.pooler_output)


def test_input_embeddings_are_the_text_token_embedding(tiny_config):
    model = AgriCLIPModel(tiny_config)
    assert model.get_input_embeddings() is model.text_model.embeddings.token_embedding
    replacement = torch.nn.Embedding(tiny_config.text_config.vocab_size, tiny_config.text_config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.text_model.embeddings.token_embedding is replacement


def test_resize_token_embeddings_adds_new_disease_names(tmp_path, clip_tokenizer, inputs):
    clip_tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")  # a copy: the session's stays as it is
    model = tiny("resnet")
    old_vocab = model.config.text_config.vocab_size
    old_rows = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = model(**inputs).logits_per_image
    assert tokenizer.add_tokens(["<tan-spot>", "<stripe-rust>"]) == 2
    embeddings = model.resize_token_embeddings(len(tokenizer))
    assert embeddings is model.get_input_embeddings() and embeddings.num_embeddings == old_vocab + 2
    assert model.config.text_config.vocab_size == old_vocab + 2 == model.text_model.config.vocab_size
    torch.testing.assert_close(embeddings.weight[:old_vocab], old_rows, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, before, rtol=0, atol=0)  # old tokens unchanged
    prompts = tokenizer(["a wheat leaf with <tan-spot>", "a wheat leaf with <stripe-rust>"], return_tensors="pt")
    assert (prompts["input_ids"] >= old_vocab).sum() == 2
    batch = {**prompts, "pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    model.save_pretrained(tmp_path / "resized")
    reloaded = AgriCLIPModel.from_pretrained(tmp_path / "resized").eval()
    assert reloaded.config.text_config.vocab_size == old_vocab + 2
    assert reloaded.get_input_embeddings().num_embeddings == old_vocab + 2
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# push_to_hub's card
# ---------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_writes_a_truthful_minimal_card(fake_hub, tiny_model):
    tiny_model.push_to_hub("agri/contract-tiny", tags=["plant-disease"])
    card = ModelCard(fake_hub.files("agri/contract-tiny")["README.md"].decode())
    assert "Model Card for Model ID" not in card.text and "automatically generated" not in card.text
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.library_name == "transformers"
    assert {"custom_code", "agriclip", "plant-disease"} <= set(card.data.tags)
    assert "agriclip card" in card.text and 'model="agri/contract-tiny"' in card.text
    # A card the repo already has (the full one `agriclip publish` uploads) is kept, tags added.
    full_card = "---\nlicense: apache-2.0\ntags:\n- agriclip\n---\n\n# The full card\n"
    HfApi().upload_file(path_or_fileobj=full_card.encode(), path_in_repo="README.md", repo_id="agri/contract-tiny")
    tiny_model.push_to_hub("agri/contract-tiny", tags=["wheat"])
    kept = ModelCard(fake_hub.files("agri/contract-tiny")["README.md"].decode())
    assert "# The full card" in kept.text and kept.data.license == "apache-2.0"
    assert {"agriclip", "wheat"} <= set(kept.data.tags)
