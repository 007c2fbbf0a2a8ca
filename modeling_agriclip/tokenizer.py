"""The real CLIP BPE tokenizer, rebuilt offline.

OpenAI CLIP's byte-pair vocabulary ships inside the ``open-clip-torch`` wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. This module rebuilds the exact 49,408-token
``CLIPTokenizer`` of ``openai/clip-vit-base-patch16`` from that file, so tests and the demo never
download from the Hub. ``open_clip`` itself is never imported (it pulls torchvision, which does not
import beside the CPU torch build); only its data file is read.

Command line: ``agriclip tokenizer --output DIR``.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


CLIP_CONTEXT_LENGTH = 77
# The BPE file lists 262,144 merges; CLIP keeps the first 49,152 - 256 - 2 so that the vocabulary
# (256 bytes, 256 end-of-word bytes, merges, 2 special tokens) has 49,408 entries.
CLIP_NUM_MERGES = 49152 - 256 - 2


def find_bpe_vocab_file() -> Path:
    """Locates ``bpe_simple_vocab_16e6.txt.gz`` in the installed ``open-clip-torch`` distribution."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The CLIP BPE vocabulary comes from the open-clip-torch wheel, which is not installed. "
            "Install its data without its dependencies: pip install --no-deps open-clip-torch"
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch package")
    return path


@lru_cache(maxsize=1)
def _vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """Builds OpenAI CLIP's tokenizer (ids identical to ``openai/clip-vit-base-patch16``) from the local BPE file."""
    vocab, merges = _vocab_and_merges(str(bpe_path or find_bpe_vocab_file()))
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_CONTEXT_LENGTH)
