"""The CLIP tokenizer of every Stable Diffusion text encoder, built offline from the shipped BPE file (README.md)."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

BPE_FILE = Path(__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges as its `SimpleTokenizer` builds them from the BPE file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1])
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A transformers CLIPTokenizer identical to the hub's `openai/clip-vit-large-patch14` one (pad `<|endoftext|>`)
    or to SD 2.x's / SDXL's OpenCLIP one (pad `!`), with no download."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token,
                         model_max_length=model_max_length)
