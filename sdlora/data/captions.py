"""Captions and prompts: sidecar caption files in any common encoding, how a caption becomes the prompt of a
training step (trigger, tag shuffle, caption dropout), and kohya's tag counts."""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from sdlora.data.images import display_name
from sdlora.errors import SdloraError

CAPTION_SUFFIXES = (".txt", ".caption")
MAX_CAPTION_CHARS = 10_000  # what training reads of a caption (T5-XXL's 512 tokens are about 2,500 characters)
MAX_CAPTION_WORDS = MAX_CAPTION_CHARS // 2

_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def decode_caption(raw: bytes, path: Path) -> str:
    """Caption text in any common encoding: UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252 /
    Latin-1 as older editors write it. Binary content (NUL or control bytes) is an error naming the file."""
    text = None
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            try:
                text = raw.decode(enc)
            except UnicodeDecodeError as e:
                raise SdloraError(f"caption {display_name(path, full=True)}: invalid {enc} text (byte {e.start}); "
                                  "re-save it as UTF-8") from e
            break
    if text is None:
        for enc in ("utf-8", "cp1252", "latin-1"):
            try:
                text = raw.decode(enc)
                break
            except UnicodeDecodeError:
                continue
    bad = [c for c in text if unicodedata.category(c) == "Cc" and not c.isspace()]  # NUL, ESC, C1 controls
    if bad:
        raise SdloraError(f"caption {display_name(path, full=True)}: not text (holds control byte "
                          f"{bad[0].encode('unicode_escape').decode('ascii')}); re-save it as UTF-8 text")
    return text


def read_caption(image: Path) -> str | None:
    """The sidecar caption of `image` (`name.txt` or `name.caption`, first found), stripped; None if there is none."""
    for suffix in CAPTION_SUFFIXES:
        side = image.with_suffix(suffix)
        if side.is_file():
            try:
                raw = side.read_bytes()
            except OSError as e:
                raise SdloraError(f"caption {display_name(side, full=True)}: cannot read it ({e.strerror or e}); "
                                  "check its permissions") from e
            # cut first: a megabyte of caption would be split, tokenized and shuffled every step (the text
            # encoders read a few hundred tokens of it); train.step.long_captions says so
            text = " ".join(decode_caption(raw, side).split()[:MAX_CAPTION_WORDS])[:MAX_CAPTION_CHARS]
            return text or None
    return None


@dataclass(frozen=True)
class PromptRules:
    """How a caption becomes the prompt of one training step."""

    prompt: str  # the prompt of images without a caption
    trigger: str  # substituted for {trigger}; put first when a caption does not contain it
    shuffle_tags: bool = False  # shuffle the comma-separated tags ...
    keep_tags: int = 0  # ... keeping the first N in place (the trigger is usually one of them)
    dropout: float = 0.0  # probability of training on the empty prompt (helps the adapter work unprompted)

    def base_caption(self, caption: str | None) -> str:
        """The caption with the trigger in it; the instance prompt when the image has no caption."""
        if not caption:
            return self.prompt
        if "{trigger}" in caption:
            return caption.replace("{trigger}", self.trigger)
        if self.trigger and not re.search(rf"(?<!\w){re.escape(self.trigger)}(?!\w)", caption):  # whole words only
            return f"{self.trigger}, {caption}"
        return caption

    def final(self, caption: str, rng: random.Random) -> str:
        """The prompt for one step: maybe dropped, maybe tag-shuffled (keeping the first `keep_tags`)."""
        if self.dropout and rng.random() < self.dropout:
            return ""
        if not self.shuffle_tags:
            return caption
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: self.keep_tags], tags[self.keep_tags:]
        rng.shuffle(tail)
        return ", ".join(head + tail)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's ss_tag_frequency counts per dataset folder: comma-separated tags."""
    freq: dict[str, int] = {}
    for c in captions:
        for tag in (t.strip()[:200] for t in c.split(",")):  # a tag is a few words; bounds.SHOWN_CHARS
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq
