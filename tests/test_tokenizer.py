"""The CLIP BPE tokenizer rebuilt offline from open-clip-torch's vocabulary file."""

import pytest
from transformers import AutoTokenizer

from agriclip.cli import main as agriclip
from modeling_agriclip.tokenizer import build_clip_tokenizer, find_bpe_vocab_file


def test_ids_match_openai_clip(clip_tokenizer):
    # Token ids of openai/clip-vit-base-patch16 for this sentence (transformers CLIP docs).
    assert clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer) == 49408
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    assert clip_tokenizer.model_max_length == 77


def test_command_writes_a_loadable_tokenizer(tmp_path, clip_tokenizer):
    assert agriclip(["tokenizer", "--output", str(tmp_path)]) == 0
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Wheat leaf with yellow rust pustules, 2 lesions"
    assert loaded(text).input_ids == clip_tokenizer(text).input_ids


def test_missing_vocabulary_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_clip_tokenizer(tmp_path / "absent.txt.gz")
    assert find_bpe_vocab_file().name == "bpe_simple_vocab_16e6.txt.gz"
