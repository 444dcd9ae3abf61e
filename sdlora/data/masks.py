"""Loss masks (`--masks DIR`, `--alpha-mask`): which pixels of a training image the loss learns from.

A mask is a greyscale image per training image, same file stem, in the masks folder (white = learn, black = ignore,
grey in between), or the image's own alpha channel. It is resized and centre-cropped exactly as its image is
(`images.cover_crop`, so it follows buckets), flipped with it, and averaged down to the latent grid
(`to_latent`: area interpolation, as kohya's `apply_masked_loss` resizes it); the latent cache stores it beside the
latent and keys the entry on it (`sdlora.cache.LatentCache`). The loss of each latent pixel is multiplied by the mask
before the mean (`train.step.per_sample_loss`), as kohya does: an all-white mask trains exactly as no mask, bit for
bit. A mask that covers nothing would train nothing and is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdlora.data.images import IMAGE_SUFFIXES, cover_crop, display_name, image_size
from sdlora.errors import SdloraError

ALPHA = "alpha"  # Example.mask for --alpha-mask: the image's own alpha channel


def mask_file(image: Path, folder: Path) -> Path | None:
    """The mask of `image` in `folder`: the image file with the same stem (any image suffix), or None."""
    for suffix in sorted(IMAGE_SUFFIXES):
        for cand in (folder / (image.stem + suffix), folder / (image.stem + suffix.upper())):
            if cand.is_file():
                return cand
    return None


def _open(path: Path, alpha: bool) -> Image.Image:
    """The mask as an 8-bit greyscale image, EXIF-oriented as its image is: a greyscale file (colour is converted
    to its luminance), or the alpha channel of the image (fully opaque without one)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if not alpha:
                return im.convert("L")
            if im.mode in ("RGBA", "LA", "PA", "RGBa") or (im.mode == "P" and "transparency" in im.info):
                return im.convert("RGBA").getchannel("A")
            return Image.new("L", im.size, 255)
    except Exception as e:  # Pillow raises many types on corrupt data
        raise SdloraError(f"{display_name(path, full=True)}: cannot read it as a mask ({e}); fix or remove it") from e


def load_mask(source: Path | str, image: Path, size: tuple[int, int]):
    """The mask of `image` at training size `size` (width, height), resized to cover it and centre-cropped as
    `images.load_image` does with the image: a float tensor [H, W] in [0, 1]. `source`: the mask file, or ALPHA."""
    import torch

    alpha = source == ALPHA
    im = _open(image if alpha else Path(source), alpha)
    w, h = image_size(image)
    if im.size != (w, h):  # a mask drawn at another size covers the same picture: stretched onto the image first
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    tw, th = size
    nw, nh, left, top = cover_crop(w, h, tw, th)
    im = im.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def to_latent(mask, latent_hw: tuple[int, int], flip: bool):
    """A pixel mask [H, W] averaged onto the latent grid (area interpolation), flipped with its latent: [1, h, w]."""
    import torch.nn.functional as F

    m = F.interpolate(mask[None, None], size=latent_hw, mode="area")[0]
    return m.flip(-1) if flip else m


def coverage(source: Path | str, image: Path, size: tuple[int, int]) -> float:
    """The share of the training crop the mask lets the loss learn from (mean of the mask, 0..1)."""
    return float(load_mask(source, image, size).mean())


def check_folders(cfg, dataset) -> None:
    """Before the model loads: --masks is a folder holding a mask for every instance image, --validation-images a
    folder."""
    if cfg.validation_images and not Path(cfg.validation_images).is_dir():
        raise SdloraError(f"--validation-images {cfg.validation_images}: no such folder; pass a folder of held-out "
                          "images")
    if not cfg.masks:
        return
    folder = Path(cfg.masks)
    if not folder.is_dir():
        raise SdloraError(f"--masks {cfg.masks}: no such folder; pass the folder of greyscale masks (one per "
                          "training image, same file stem)")
    for c in dataset.concepts:
        for p in c.images:
            if mask_file(p, folder) is None:
                raise SdloraError(f"--masks {cfg.masks}: no mask for {display_name(p)} (a greyscale image named "
                                  f"{display_name(Path(p.stem))}.png in that folder); add it, or drop --masks")


def attach(examples: list, folder: str | None, alpha: bool, say=print) -> None:
    """Give each instance example its mask source (`Example.mask`), refusing in one line a missing mask and a mask
    that covers nothing. Class examples keep none (they learn everywhere)."""
    if not folder and not alpha:
        return
    if folder and not Path(folder).is_dir():
        raise SdloraError(f"--masks {folder}: no such folder; pass the folder of greyscale masks (one per training "
                          "image, same file stem)")
    shares = []
    for ex in examples:
        if ex.is_class:
            continue
        source = ALPHA if alpha else mask_file(ex.path, Path(folder))
        if source is None:
            raise SdloraError(f"--masks {folder}: no mask for {display_name(ex.path)} (a greyscale image named "
                              f"{display_name(Path(ex.path.stem))}.png in that folder); add it, or drop --masks")
        m = load_mask(source, ex.path, ex.size)
        if float(m.max()) == 0.0:
            what = f"the alpha channel of {display_name(ex.path)}" if alpha else display_name(Path(source))
            raise SdloraError(f"{what} covers nothing (all black at the training crop), so "
                              f"{display_name(ex.path)} would train nothing; whiten what it should learn, or remove "
                              "the image")
        ex.mask = source
        shares.append(float(m.mean()))
    if shares:
        say(f"masks: {len(shares)} images ({'alpha channels' if alpha else folder}), mean coverage "
            f"{100 * sum(shares) / len(shares):.1f}%")
