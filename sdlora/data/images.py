"""Image files: find and fully decode the images of a folder before any model loads (unreadable files are named,
or skipped with --skip-bad-images), and load one as a training tensor (EXIF-oriented, RGB, cover-crop).

Pure data handling (no models), so it is tested directly.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sdlora.errors import SdloraError, cause

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class ScanResult:
    images: list[Path]
    bad: list[tuple[Path, str]]  # (file, reason)
    ignored: list[Path]  # files that are not images (captions, notes)
    special: list[Path] = field(default_factory=list)  # not regular files (FIFOs, devices, sockets): skipped unread


def scan(folder: Path) -> ScanResult:
    """Find the images of `folder` (not recursive) and fully decode each one to catch corrupt or truncated files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdloraError(f"{folder}: no such folder; pass a folder of training images")
    images, bad, ignored, special = [], [], [], []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not p.is_file():  # a FIFO, device or socket (or a link to one): opening it could block forever
            special.append(p)
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(p)
            continue
        try:
            decode(p)  # decodes every byte and the colour conversion: bad files fail here, not mid-training
        except SdloraError as e:
            bad.append((p, e.reason))
            continue
        images.append(p)
    return ScanResult(images, bad, ignored, special)


def refuse_or_skip_bad(folder: Path, bad: list[tuple[Path, str]], skip_bad: bool, log=print) -> None:
    """Unreadable images: a one-line SdloraError naming them (and the fix), or with `skip_bad` a warning."""
    if bad and not skip_bad:
        names = ", ".join(f"{display_name(p)} ({why})" for p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SdloraError(f"{display_name(folder, full=True)}: cannot read {names}{more}; fix or remove them, "
                          "or pass --skip-bad-images")
    if bad:
        log(f"warning: skipping {len(bad)} unreadable image(s) in {display_name(folder, full=True)}: "
            + ", ".join(f"{display_name(p)} ({why})" for p, why in bad))


def checked_images(folder: Path, what: str = "--images", skip_bad: bool = False,
                   allow_empty: bool = False) -> list[Path]:
    """The images of `folder`, or an SdloraError naming the problem (no images, unreadable files)."""
    res = scan(folder)
    refuse_or_skip_bad(folder, res.bad, skip_bad)
    if not res.images and not allow_empty:
        raise SdloraError(f"{folder} ({what}) has no images; add .jpg/.png/.webp files to it")
    return res.images


def display_name(path: Path, full: bool = False) -> str:
    """A file name safe to print on any terminal: bytes that are not UTF-8 (kept by Python as surrogates) and
    control characters (a newline in a name) are shown as escapes, e.g. `caf\\xe9.png`."""
    text = str(path) if full else Path(path).name
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class BadImage(SdloraError):
    """An image that cannot be used; `reason` is the short why, the message names the file and the fix."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{display_name(path, full=True)}: cannot read it ({reason}); fix or remove it, "
                         "or pass --skip-bad-images")


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, alpha composited onto white. 16-bit and 32-bit greys are scaled to 8 bits
    (Pillow's own conversion clips them, so a 16-bit mid-grey would turn white); palettes with transparency and
    grey+alpha keep their alpha; CMYK, YCbCr, LAB and HSV use Pillow's conversions."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        with np.errstate(invalid="ignore"):  # float images may hold NaN/inf: they become black
            arr = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif im.mode == "F" and arr.size and 0 <= arr.min() and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    return im.convert("RGB")


def decode(path: Path) -> Image.Image:
    """The image at `path` fully decoded, EXIF-oriented and in 8-bit RGB; any problem (truncated, corrupt, not
    an image, a decompression bomb, an unsupported mode) is a BadImage naming the file."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: decoding such a file can take gigabytes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decodes every byte: truncated files fail here, not mid-training
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
                rgb.load()
                return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(path, f"decompression bomb: {cause(e)}") from e
    except MemoryError as e:
        raise BadImage(path, "too large to decode in memory") from e
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, ValueError, struct.error, ...)
        raise BadImage(path, cause(e)) from e



def image_size(path: Path) -> tuple[int, int]:
    """Size after EXIF orientation."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # a file changed since the scan, or unreadable EXIF
        raise BadImage(path, cause(e)) from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def cover_crop(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """Resize (w, h) to cover (tw, th) keeping the aspect ratio, then centre-crop: (resized w, resized h, left, top)."""
    s = max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    return nw, nh, (nw - tw) // 2, (nh - th) // 2


def load_image(path: Path, size: tuple[int, int] | int) -> torch.Tensor:
    """Decode, apply EXIF orientation, convert to RGB (alpha onto white), resize to cover `size`, centre-crop.

    `size` is (width, height) or one side of a square. Returns a float tensor [3, H, W] in [-1, 1].
    """
    tw, th = (size, size) if isinstance(size, int) else size
    im = decode(path)
    nw, nh, left, top = cover_crop(*im.size, tw, th)
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    im = im.crop((left, top, left + tw, top + th))
    import torch  # here, not at the top: option checks read this module and must not wait for torch

    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

