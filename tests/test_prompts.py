"""Zero-shot templates, caption generation from metadata, and the paraphraser interface."""

import json
import random

import pytest
import yaml

from training.prompts import (
    CaptionGenerator,
    DatasetMetadata,
    TransformersParaphraser,
    with_article,
)


LEAF = {
    "domain": "plant disease",
    "subject": "tomato leaf",
    "setting": "in a greenhouse",
    "sensor": "smartphone",
    "classes": {
        "early_blight": {"name": "early blight", "description": ["concentric brown rings", "yellow halos"]},
        "healthy": {"name": "healthy", "relation": "attribute", "description": "a uniform green colour"},
    },
}
FISH = {
    "domain": "fish species",
    "subject": "fish",
    "relation": "attribute",
    "kind": "species",
    "classes": {"clownfish": {"description": ["an orange body", "white bands"]}, "grass_carp": {}},
}


def test_with_article():
    assert with_article("early blight") == "an early blight"
    assert with_article("tomato leaf") == "a tomato leaf"
    assert with_article("uniform leaf") == "a uniform leaf"
    assert with_article("hour") == "an hour"


def test_captions_are_seeded_distinct_and_name_the_class_details():
    generator = CaptionGenerator(DatasetMetadata.from_dict(LEAF))
    first = generator.captions("early_blight", 6, random.Random(0))
    assert first == generator.captions("early_blight", 6, random.Random(0))
    assert first != generator.captions("early_blight", 6, random.Random(1))
    assert len(set(first)) == 6
    for caption in first:
        assert "tomato leaf with early blight" in caption or "early blight" in caption
        assert "concentric brown rings" in caption or "yellow halos" in caption
    healthy = generator.captions("healthy", 3, random.Random(0))
    assert all("healthy tomato leaf" in caption and "uniform green colour" in caption for caption in healthy)
    assert generator.base_caption("early_blight") == (
        "a photo of a tomato leaf with early blight, showing concentric brown rings and yellow halos."
    )


def test_attribute_relation_and_unlisted_class():
    generator = CaptionGenerator(DatasetMetadata.from_dict(FISH))
    assert generator.base_caption("clownfish") == "a photo of a clownfish, showing an orange body and white bands."
    assert generator.base_caption("grass_carp") == "a photo of a grass carp fish."
    assert generator.base_caption("tiger_barb") == "a photo of a tiger barb fish."  # not in the file: label as name
    # Only as many distinct captions as combinations exist; the rest repeat them.
    assert len(generator.captions("grass_carp", 4, random.Random(0))) == 4


def test_metadata_files(tmp_path):
    (tmp_path / "leaf.yaml").write_text(yaml.safe_dump(LEAF))
    (tmp_path / "fish.json").write_text(json.dumps(FISH))
    leaf = DatasetMetadata.from_file(tmp_path / "leaf.yaml")
    assert leaf.class_metadata("early_blight").description == ["concentric brown rings", "yellow halos"]
    assert DatasetMetadata.from_dict(leaf.to_dict()) == leaf
    assert DatasetMetadata.from_file(tmp_path / "fish.json").class_metadata("grass_carp").name == "grass carp"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**LEAF, "sensr": "drone"}))
    with pytest.raises(ValueError, match=r"typo\.yaml.*sensr"):
        DatasetMetadata.from_file(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="empty name"):
        DatasetMetadata.from_dict({**LEAF, "classes": {"x": {"name": " "}}})
    with pytest.raises(ValueError, match="relation"):
        DatasetMetadata.from_dict({**LEAF, "relation": "is"})


def test_empty_caption_is_an_error():
    generator = CaptionGenerator(DatasetMetadata.from_dict({**LEAF, "templates": ["  "]}))
    with pytest.raises(ValueError, match="empty caption for class 'healthy'"):
        generator.captions("healthy", 2, random.Random(0))


def test_paraphraser_callable_is_used_and_topped_up():
    calls = []

    def paraphraser(caption, n, rng):
        calls.append((caption, n))
        return ["  a tomato leaf  showing early blight ", "", caption, "a tomato leaf showing early blight"]

    generator = CaptionGenerator(DatasetMetadata.from_dict(LEAF), paraphraser)
    captions = generator.captions("early_blight", 4, random.Random(0))
    assert calls == [(generator.base_caption("early_blight"), 3)]
    assert captions[:2] == [generator.base_caption("early_blight"), "a tomato leaf showing early blight"]
    assert len(captions) == 4 and len(set(captions)) == 4 and all(captions)


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A randomly initialised 1-layer GPT-2 with a word-level tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = "a photo of tomato leaf with early blight showing brown rings and yellow halos rewrite : . ,".split()
    vocabulary = {token: index for index, token in enumerate(["<unk>", "<eos>", "\n", *words])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(vocabulary), n_positions=128, n_embd=16, n_layer=1, n_head=2, eos_token_id=1, bos_token_id=1
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_transformers_paraphraser_is_seeded(tiny_causal_lm):
    import torch

    paraphraser = TransformersParaphraser(tiny_causal_lm, max_new_tokens=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = paraphraser("a photo of a tomato leaf with early blight", 3, random.Random(0))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert len(first) == 3 and all(isinstance(text, str) for text in first)
    assert first == paraphraser("a photo of a tomato leaf with early blight", 3, random.Random(0))
    generator = CaptionGenerator(DatasetMetadata.from_dict(LEAF), paraphraser)
    captions = generator.captions("early_blight", 4, random.Random(0))
    assert len(captions) == 4 and all(caption.strip() for caption in captions)
