"""The training set: one `Example` per image (its caption, the size it trains at, its crop), and the warning
about images smaller than that size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.data.buckets import nearest_bucket
from sdlora.data.captions import PromptRules, read_caption
from sdlora.data.images import cover_crop, display_name, image_size


@dataclass
class Example:
    path: Path
    caption: str  # with the trigger substituted; tag shuffle/dropout happen per step
    size: tuple[int, int]  # (width, height) it is trained at
    is_class: bool = False
    orig_size: tuple[int, int] = (0, 0)  # (width, height) of the file, after EXIF orientation
    crop_top_left: tuple[int, int] = (0, 0)  # where the centre crop starts in the resized image
    has_caption: bool = False  # a .txt/.caption sidecar was found
    repeats: int = 1  # times per epoch (times the run's --repeats): its concept folder's N (kohya `N_words`)
    mask: Path | str | None = None  # loss mask: its file, "alpha" (its alpha channel), None (sdlora/data/masks.py)

    def sdxl_time_ids(self) -> list[int]:
        """SDXL's size/crop micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
        return [self.orig_size[1], self.orig_size[0], *self.crop_top_left, self.size[1], self.size[0]]


def build_examples(images: list[Path], rules: PromptRules, resolution: int, bucket_list: list[tuple[int, int]] | None,
                   fixed_caption: str | None = None, is_class: bool = False, repeats: int = 1,
                   warn: bool = True) -> list[Example]:
    """One Example per image: its caption (sidecar, or the prompt) and its training size (bucket or square)."""
    out = []
    for p in images:
        sidecar = None if fixed_caption is not None else read_caption(p)
        caption = fixed_caption if fixed_caption is not None else rules.base_caption(sidecar)
        orig = image_size(p)
        size = nearest_bucket(orig, bucket_list) if bucket_list else (resolution, resolution)
        _, _, left, top = cover_crop(*orig, *size)
        out.append(Example(p, caption, size, is_class, orig, (top, left), sidecar is not None, repeats))
    if warn:
        warn_small(out)
    return out


def small_images(examples: list[Example]) -> list[Example]:
    """Examples whose file is smaller than the size they train at, in either direction (they get upscaled)."""
    return [e for e in examples if e.orig_size[0] < e.size[0] or e.orig_size[1] < e.size[1]]


def warn_small(examples: list["Example"], log=print) -> None:
    """Warn, naming them, about images smaller than the size they train at (they are upscaled)."""
    small = small_images(examples)
    if small:
        names = ", ".join(f"{display_name(e.path)} ({e.orig_size[0]}x{e.orig_size[1]} < {e.size[0]}x{e.size[1]})"
                          for e in small[:3])
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        log(f"warning: {len(small)} image(s) smaller than the training size are upscaled (softer results): "
            f"{names}{more}; use larger images or a lower --resolution")

