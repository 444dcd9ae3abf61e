"""Captions counted in CLIP tokens, as every Stable Diffusion text encoder reads them: how many a caption has, what
a 77-token window cuts off, and the longest start of a caption that fits a budget. The tokenizer is built offline
(sdlora/archs/clip_tokenizer); `sdlora scan` and `sdlora caption` use these."""

from __future__ import annotations

import functools

CLIP_WINDOW = 77  # tokens a CLIP text encoder reads, its start and end tokens included
CLIP_TEXT_TOKENS = CLIP_WINDOW - 2  # ... of the caption itself


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from sdlora.archs.clip_tokenizer import clip_tokenizer

    return clip_tokenizer()


def token_ids(texts: list[str]) -> list[list[int]]:
    """Each text's CLIP token ids, without the start and end tokens."""
    return _tokenizer()(list(texts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def token_count(text: str) -> int:
    """CLIP tokens of `text`, without the start and end tokens."""
    return len(token_ids([text])[0])


def counted(texts: list[str], keep: int = CLIP_TEXT_TOKENS) -> list[tuple[int, str]]:
    """Each text's CLIP token count (without the start and end tokens) and the part of the text past its first
    `keep` tokens, as written ('' when it fits): what a 77-token window does not read."""
    enc = _tokenizer()(list(texts), add_special_tokens=False, truncation=False, verbose=False,
                       return_offsets_mapping=True)
    return [(len(offsets), text[offsets[keep][0]:].strip() if len(offsets) > keep else "")
            for text, offsets in zip(texts, enc["offset_mapping"])]


def fit(parts: list[str], sep: str, budget: int, head: str = "", head_sep: str = ", ") -> str:
    """`head`, then the longest run of `parts` from the start joined by `sep`, at most `budget` tokens in all:
    cut at a part boundary (a word or a tag), never inside one. CLIP tokenizes word by word, so the count grows
    with each part and a binary search finds the cut."""
    def joined(k: int) -> str:
        body = sep.join(parts[:k])
        return head_sep.join(t for t in (head, body) if t)

    lo, hi = 0, len(parts)  # joined(lo) fits (or is the head alone); find the largest k that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if token_count(joined(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return joined(lo)
