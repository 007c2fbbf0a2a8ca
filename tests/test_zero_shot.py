"""ZeroShotClassifier: prompt ensembles, the label cache, batching, AgriCLIP embedding sources and a CLIP baseline."""

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from agriclip.errors import SingleLabelWarning
from agriclip.templates import check_template, check_templates, fill_templates
from modeling_agriclip.zero_shot import UnavailableModelError, ZeroShotClassifier, adapter_base


CLASSES = ["leaf rust", "healthy leaf", "powdery mildew"]
TEMPLATES = ["a photo of {}.", "a close-up photo of {}.", "a field photo showing {}."]


@pytest.fixture
def classifier(tiny_model, tiny_processor):
    return ZeroShotClassifier(tiny_model, tiny_processor, batch_size=2)


def _text_features(model, processor, texts):
    batch = processor(text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_label_embeddings_are_the_normalised_mean_of_normalised_template_embeddings(
    classifier, tiny_model, tiny_processor
):
    labels = classifier.label_embeddings(CLASSES, TEMPLATES)
    assert labels.shape == (len(CLASSES), tiny_model.config.projection_dim)
    for row, name in zip(labels, CLASSES):
        prompts = F.normalize(_text_features(tiny_model, tiny_processor, [t.format(name) for t in TEMPLATES]), dim=-1)
        expected = F.normalize(prompts.mean(dim=0), dim=-1)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    # Normalising before averaging matters: the unnormalised mean points elsewhere.
    raw = _text_features(tiny_model, tiny_processor, [t.format(CLASSES[0]) for t in TEMPLATES])
    assert not torch.allclose(labels[0], F.normalize(raw.mean(dim=0), dim=-1), atol=1e-4)


def test_label_embeddings_are_cached_per_class_names_and_templates(classifier, monkeypatch):
    calls = []
    get_text_features = classifier.model.get_text_features
    monkeypatch.setattr(classifier.model, "get_text_features", lambda **kw: calls.append(1) or get_text_features(**kw))
    first = classifier.label_embeddings(CLASSES, TEMPLATES)
    n_calls = len(calls)
    assert n_calls == 5  # 9 prompts in batches of 2
    assert classifier.label_embeddings(list(CLASSES), tuple(TEMPLATES)) is first
    assert len(calls) == n_calls
    # Another embedding source of the same model shares the cache: text does not depend on it.
    assert classifier.with_embedding("clip").label_embeddings(CLASSES, TEMPLATES) is first
    classifier.label_embeddings(CLASSES, TEMPLATES[:1])
    assert len(calls) > n_calls


@pytest.mark.parametrize("embedding", ["aligned", "clip", "fused"])
def test_image_embeddings_match_the_model_and_are_batched(tiny_model, tiny_processor, sample_images, embedding):
    classifier = ZeroShotClassifier(tiny_model, tiny_processor, embedding=embedding, batch_size=2)
    embeds = classifier.image_embeddings(sample_images)
    pixel_values = tiny_processor(images=sample_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = F.normalize(tiny_model.get_image_features(pixel_values, embedding=embedding).pooler_output, dim=-1)
    torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier.image_embeddings(pixel_values), embeds, atol=1e-5, rtol=1e-5)


def test_embedding_sources_differ(tiny_model, tiny_processor, sample_images):
    aligned = ZeroShotClassifier(tiny_model, tiny_processor, embedding="aligned")
    assert not torch.allclose(
        aligned.image_embeddings(sample_images), aligned.with_embedding("clip").image_embeddings(sample_images)
    )


def test_logits_are_scaled_cosines(classifier, tiny_model, sample_images):
    logits = classifier.logits(sample_images, CLASSES, TEMPLATES)
    cosines = classifier.image_embeddings(sample_images) @ classifier.label_embeddings(CLASSES, TEMPLATES).T
    torch.testing.assert_close(logits, tiny_model.logit_scale.exp().item() * cosines)


def test_predict_returns_sorted_softmax_scores_like_the_pipeline(classifier, sample_images):
    predictions = classifier.predict(sample_images, CLASSES, TEMPLATES, top_k=2)
    probabilities = classifier.logits(sample_images, CLASSES, TEMPLATES).softmax(dim=-1)
    assert len(predictions) == len(sample_images)
    for row, image_probabilities in zip(predictions, probabilities):
        assert [set(entry) for entry in row] == [{"label", "score"}] * 2
        assert row[0]["score"] >= row[1]["score"]
        assert row[0]["label"] == CLASSES[int(image_probabilities.argmax())]
        assert row[0]["score"] == pytest.approx(image_probabilities.max().item())
    full = classifier.predict(sample_images[0], CLASSES, TEMPLATES, top_k=10)
    assert len(full) == 1 and sorted(entry["label"] for entry in full[0]) == sorted(CLASSES)
    assert sum(entry["score"] for entry in full[0]) == pytest.approx(1.0)


def test_predict_with_a_single_label_warns_that_scores_are_relative_to_the_labels(classifier, sample_images):
    with pytest.warns(
        SingleLabelWarning,
        match=r"a single label \('leaf rust'\) always scores 1.0: scores are softmax "
        "probabilities over the labels given, relative to those labels only",
    ):
        (only,) = classifier.predict(sample_images[:1], CLASSES[:1], TEMPLATES)
    assert only == [{"label": "leaf rust", "score": pytest.approx(1.0)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # several labels: no warning
        classifier.predict(sample_images[:1], CLASSES[:2], TEMPLATES)


def test_a_fusion_weight_of_its_own_leaves_the_config_and_the_other_classifiers_alone(
    tiny_model, tiny_processor, sample_images
):
    base = ZeroShotClassifier(tiny_model, tiny_processor, embedding="aligned")
    clip = base.with_embedding("clip").image_embeddings(sample_images)
    aligned = base.image_embeddings(sample_images)
    weighted = base.with_embedding("fused", fusion_weight=0.3)
    torch.testing.assert_close(
        weighted.image_embeddings(sample_images), F.normalize(0.3 * clip + 0.7 * aligned, dim=-1), atol=1e-5, rtol=1e-5
    )
    assert tiny_model.config.fusion_weight == 0.5  # untouched: the config's weight serves the plain "fused"
    torch.testing.assert_close(
        base.with_embedding("fused").image_embeddings(sample_images),
        F.normalize(0.5 * clip + 0.5 * aligned, dim=-1),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="weighs the 'fused' image embedding, but this classifier uses 'aligned'"):
        base.with_embedding("aligned", fusion_weight=0.3)
    with pytest.raises(ValueError, match=r"fusion_weight must lie in \[0, 1\], got 1.5"):
        base.with_embedding("fused", fusion_weight=1.5).image_embeddings(sample_images)


def test_works_under_inference_mode(classifier, sample_images):
    with torch.inference_mode():
        logits = classifier.logits(sample_images, CLASSES, "a photo of {}.")
    assert logits.shape == (len(sample_images), len(CLASSES)) and torch.isfinite(logits).all()


def test_bad_templates_are_errors(classifier):
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        classifier.label_embeddings(CLASSES, ["a photo of a leaf."])
    for template, message in (("{} with {}", "has 2 '{}' placeholders"), ("{name}", "has the format field(s) {name}")):
        with pytest.raises(ValueError, match=re.escape(f"template {template!r} {message}")):
            classifier.label_embeddings(CLASSES, ["a photo of {}.", template])


def test_templates_fill_exactly_one_name_and_keep_escaped_braces():
    assert fill_templates(["rust", "mildew"], ["a {{leaf}} with {}.", "{}"]) == [
        "a {leaf} with rust.",
        "rust",
        "a {leaf} with mildew.",
        "mildew",
    ]
    assert check_templates(("a photo of {}.",)) == ["a photo of {}."]
    for bad in ("a {} leaf }", "{0}", "{!r}", "{:>9}", None):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)


def test_clip_baseline(tiny_clip_baseline, sample_images):
    model, processor = tiny_clip_baseline
    classifier = ZeroShotClassifier(model, processor)
    labels = classifier.label_embeddings(CLASSES, TEMPLATES)
    prompts = F.normalize(_text_features(model, processor, [t.format(CLASSES[1]) for t in TEMPLATES]), dim=-1)
    torch.testing.assert_close(labels[1], F.normalize(prompts.mean(dim=0), dim=-1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        images = model.get_image_features(
            pixel_values=processor(images=sample_images, return_tensors="pt")["pixel_values"]
        )
    torch.testing.assert_close(
        classifier.image_embeddings(sample_images), F.normalize(images.pooler_output, dim=-1), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="CLIPModel has a single image embedding"):
        ZeroShotClassifier(model, processor, embedding="aligned")


def test_from_pretrained_loads_agriclip_and_clip_folders(
    tiny_checkpoint, tiny_clip_checkpoint, tiny_model, sample_images
):
    agriclip = ZeroShotClassifier.from_pretrained(tiny_checkpoint, embedding="clip", device="cpu")
    assert agriclip.device.type == "cpu" and agriclip.embedding == "clip"
    expected = ZeroShotClassifier(tiny_model, agriclip.processor, embedding="clip").image_embeddings(sample_images)
    torch.testing.assert_close(agriclip.image_embeddings(sample_images), expected, atol=1e-5, rtol=1e-5)
    baseline = ZeroShotClassifier.from_pretrained(tiny_clip_checkpoint)
    assert type(baseline.model).__name__ == "CLIPModel"
    assert baseline.predict(sample_images[:1], CLASSES)[0][0]["label"] in CLASSES


@pytest.fixture(scope="module")
def siglip_model():
    """A tiny model whose towers SigLIP's loss trained, with a bias that leaves its sigmoids away from 0 and 1."""
    from modeling_agriclip import AgriCLIPConfig, AgriCLIPModel

    torch.manual_seed(0)
    model = AgriCLIPModel(AgriCLIPConfig.tiny(contrastive_loss="siglip")).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
        model.logit_bias.fill_(0.5)
    return model


def test_a_siglip_model_scores_labels_with_its_bias_and_per_label_sigmoids(siglip_model, tiny_processor, sample_images):
    classifier = ZeroShotClassifier(siglip_model, tiny_processor, batch_size=2)
    assert classifier.sigmoid_scores and classifier.logit_bias == pytest.approx(0.5)
    logits = classifier.logits(sample_images, CLASSES, TEMPLATES)
    cosines = classifier.image_embeddings(sample_images) @ classifier.label_embeddings(CLASSES, TEMPLATES).T
    torch.testing.assert_close(logits, torch.e * cosines + 0.5)
    predictions = classifier.predict(sample_images, CLASSES, TEMPLATES, top_k=len(CLASSES))
    for row, image_logits in zip(predictions, logits):
        by_label = {entry["label"]: entry["score"] for entry in row}
        assert [by_label[label] for label in CLASSES] == pytest.approx(image_logits.sigmoid().tolist())
        assert all(0.0 <= entry["score"] <= 1.0 for entry in row)
        assert [entry["score"] for entry in row] == sorted(by_label.values(), reverse=True)
        assert sum(by_label.values()) != pytest.approx(1.0, abs=1e-3)
    # A single label is a question of its own: no warning, and its score is its sigmoid, not 1.0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (only,) = classifier.predict(sample_images[:1], CLASSES[:1], TEMPLATES)
    assert only[0]["score"] == pytest.approx(logits[0, 0].sigmoid().item())


def test_the_pipeline_ranks_a_siglip_model_as_the_classifier_does(
    siglip_model, tiny_processor, sample_images, tmp_path
):
    """The pipeline softmaxes AgriCLIP's logits whatever the objective (its sigmoid branch is for model types
    containing "siglip"): the bias is in the model's logits, the ranking is the classifier's, the scores a softmax."""
    from transformers import pipeline

    siglip_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    pipe = pipeline("zero-shot-image-classification", model=str(tmp_path))
    results = pipe(sample_images[0], candidate_labels=CLASSES, hypothesis_template=TEMPLATES[0])
    logits = ZeroShotClassifier(siglip_model, tiny_processor).logits(sample_images[:1], CLASSES, TEMPLATES[0])[0]
    assert [entry["label"] for entry in results] == [CLASSES[i] for i in logits.argsort(descending=True).tolist()]
    assert sum(entry["score"] for entry in results) == pytest.approx(1.0)


def test_an_adapter_folder_without_a_base_model_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    with pytest.raises(UnavailableModelError, match="names no base model"):
        ZeroShotClassifier.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert adapter_base(tmp_path) == "org/base"
    (tmp_path / "config.json").write_text("{}")
    assert adapter_base(tmp_path) is None  # a model folder that also holds an adapter config is a model folder
