"""Image folders: scan and check them before any model loads, then serve fixed-size training tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.errors import SdloraError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class ScanResult:
    images: list[Path]
    bad: list[tuple[Path, str]]  # (file, reason)
    ignored: list[Path]  # files that are not images (captions, notes)


def scan(folder: Path) -> ScanResult:
    """Find the images of `folder` (not recursive) and fully decode each one to catch corrupt or truncated files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdloraError(f"{folder}: no such folder; pass a folder of training images with --images")
    images, bad, ignored = [], [], []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(p)
            continue
        try:
            with Image.open(p) as im:
                im.load()  # decodes every byte: truncated files fail here, not mid-training
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            bad.append((p, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        images.append(p)
    return ScanResult(images, bad, ignored)


def checked_images(folder: Path, what: str = "--images", skip_bad: bool = False) -> list[Path]:
    """The images of `folder`, or an SdloraError naming the problem (no images, unreadable files)."""
    res = scan(folder)
    if res.bad and not skip_bad:
        names = ", ".join(f"{p.name} ({why})" for p, why in res.bad[:3])
        more = f" and {len(res.bad) - 3} more" if len(res.bad) > 3 else ""
        raise SdloraError(f"{folder}: cannot read {names}{more}; fix or remove them, or pass --skip-bad-images")
    if not res.images:
        raise SdloraError(f"{folder} ({what}) has no images; add .jpg/.png/.webp files to it")
    return res.images


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode, apply EXIF orientation, convert to RGB, resize the short side to `resolution`, centre-crop.

    Returns a float tensor [3, resolution, resolution] in [-1, 1].
    """
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im.convert("RGBA"))
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with their prompt, each paired with a class image (cycled) when prior preservation is on.

    Images are decoded once and kept in memory at training size; random flips are applied by the training
    loop with its own seeded generator, so a run is reproducible and resumable.
    """

    def __init__(self, instance: list[Path], instance_prompt: str, resolution: int,
                 class_images: list[Path] | None = None, class_prompt: str | None = None):
        self.instance = [load_image(p, resolution) for p in instance]
        self.instance_prompt = instance_prompt
        self.class_images = [load_image(p, resolution) for p in class_images] if class_images else []
        self.class_prompt = class_prompt

    def __len__(self) -> int:
        # As in the DreamBooth recipe, an epoch sees every class image too when there are more of them.
        return max(len(self.instance), len(self.class_images))

    def __getitem__(self, i: int) -> dict:
        item = {"pixels": self.instance[i % len(self.instance)], "prompt": self.instance_prompt}
        if self.class_images:
            item["class_pixels"] = self.class_images[i % len(self.class_images)]
            item["class_prompt"] = self.class_prompt
        return item
