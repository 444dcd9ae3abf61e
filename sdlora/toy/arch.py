"""The toy base model's architecture: a word-level CLIP tokenizer and SD1-shaped configs at toy sizes."""

from __future__ import annotations

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

from sdlora.archs import load_config
from sdlora.toy import world

MAX_TOKENS = 16  # the longest caption is 8 words + start/end tokens


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(words=world.WORDS, max_tokens: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make each of `words` one token; any other text falls back to
    characters (every byte is in the vocabulary, alone or word-final), as CLIP's own tokenizer does."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        # Add merges until the word is one token under all merges so far. A new merge has the lowest
        # priority, so it never changes how an earlier word is split.
        while len(parts := _bpe(w, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)
    for w in words:
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))
    return tok


def unet_config() -> dict:
    return load_config("sd15", "unet") | {
        "sample_size": world.SIZE // 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "attention_head_dim": 8,
        "cross_attention_dim": 64,
    }


def text_encoder_config(tokenizer) -> dict:
    return load_config("sd15", "text_encoder") | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": 64,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def vae_config() -> dict:
    return load_config("sd15", "vae") | {
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": world.SIZE,
    }
