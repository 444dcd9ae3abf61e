"""Image folders: scan and check them before any model loads; captions, prompts and aspect-ratio buckets.

Everything here is pure data handling (no models), so it is tested directly.
"""

from __future__ import annotations

import math
import os
import random
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sdlora.errors import SdloraError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_CAPTION_CHARS = 10_000  # what training reads of a caption (T5-XXL's 512 tokens are about 2,500 characters)
MAX_CAPTION_WORDS = MAX_CAPTION_CHARS // 2


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


def warn_small(examples: list["Example"], log=print) -> None:
    """Warn, naming them, about images smaller than the size they train at (they are upscaled)."""
    small = small_images(examples)
    if small:
        names = ", ".join(f"{display_name(e.path)} ({e.orig_size[0]}x{e.orig_size[1]} < {e.size[0]}x{e.size[1]})"
                          for e in small[:3])
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        log(f"warning: {len(small)} image(s) smaller than the training size are upscaled (softer results): "
            f"{names}{more}; use larger images or a lower --resolution")


def checked_images(folder: Path, what: str = "--images", skip_bad: bool = False, allow_empty: bool = False) -> list[Path]:
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
        raise BadImage(path, f"decompression bomb: {_first_line(e)}") from e
    except MemoryError as e:
        raise BadImage(path, "too large to decode in memory") from e
    except Exception as e:  # Pillow raises many types on corrupt data (OSError, ValueError, SyntaxError, struct.error, ...)
        raise BadImage(path, _first_line(e)) from e


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200] or type(e).__name__


# ---------------------------------------------------------------- captions and prompts

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


# ---------------------------------------------------------------- buckets

def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with about resolution² pixels and aspect ratio up to `max_ratio`."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))


def image_size(path: Path) -> tuple[int, int]:
    """Size after EXIF orientation."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # a file changed since the scan, or unreadable EXIF
        raise BadImage(path, _first_line(e)) from e
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


# ---------------------------------------------------------------- the training set

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


def epoch_batches(examples: list[Example], batch_size: int, repeats: int, epoch: int, seed: int) -> list[list[int]]:
    """The batches of one epoch: each example `repeats` × its own `repeats` times, shuffled by (seed, epoch), grouped
    so that a batch holds one size only; the last, short batch of a size is kept. Deterministic, so a resumed run
    replays it."""
    rng = random.Random(seed * 100_003 + epoch)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        by_size.setdefault(ex.size, []).extend([i] * (repeats * ex.repeats))
    batches = []
    for size in sorted(by_size):
        idx = by_size[size]
        rng.shuffle(idx)
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


class Schedule:
    """Which examples each micro-step trains on: deterministic in (seed, epoch), so a resumed run replays it.

    Process `rank` of `world` gets every world-th batch of an epoch; class examples (prior preservation) follow
    one shuffled order, as many per micro-step as instance examples. `position` continues a saved schedule.
    """

    def __init__(self, instance: list[Example], classes: list[Example], batch_size: int, repeats: int, seed: int,
                 rank: int = 0, world: int = 1, position: dict | None = None):
        self.instance, self.classes = instance, classes
        self.batch_size, self.repeats, self.seed, self.rank, self.world = batch_size, repeats, seed, rank, world
        pos = position or {"epoch": 0, "batch": 0, "micro": 0}
        self.epoch, self.batch, self.micro = pos["epoch"], pos["batch"], pos["micro"]
        self.class_order = list(range(len(classes)))
        random.Random(seed + 17).shuffle(self.class_order)
        self._batches = None

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0)) // self.world

    def _epoch(self, epoch: int) -> list[list[int]]:
        b = epoch_batches(self.instance, self.batch_size, self.repeats, epoch, self.seed)
        b += b[: (-len(b)) % self.world]  # every process gets the same number of batches
        return b

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "micro": self.micro}

    def next(self) -> tuple[list[Example], list[Example]]:
        """The instance examples and class examples of the next micro-step."""
        if self._batches is None:
            self._batches = self._epoch(self.epoch)
        if self.batch * self.world >= len(self._batches):
            self.epoch, self.batch = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        idx = self._batches[self.batch * self.world + self.rank]
        self.batch += 1
        inst = [self.instance[i] for i in idx]
        cls = []
        if self.classes:
            start = (self.micro * self.world + self.rank) * len(idx)
            cls = [self.classes[self.class_order[(start + j) % len(self.classes)]] for j in range(len(idx))]
        self.micro += 1
        return inst, cls
