"""A hand-written judge: what a toy-world image shows (object colour, shape, background).

No learned weights, so it cannot share a generator's blind spots and its behaviour is readable:

1. background = the palette background nearest to the median of the border pixels;
2. each pixel's distance to that background colour; the object is where the distance exceeds half its
   maximum (half-maximum thresholding puts the edge where it was before any blur);
3. colour = the palette colour nearest to the mean of the object's core (distance above 3/4 of the max);
4. shape = the shape template (circle, square, triangle, ring), fitted to the object's centroid and area,
   with the highest soft IoU against the object mask; "none" when there is no object or nothing fits.

Its accuracy on held-out renders, clean and degraded (blur, noise, colour shifts like a diffusion model's),
is measured by `accuracy_on_renders` and reported by `python -m sdlora.toy report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdlora.toy import world

_BG = np.array(list(world.BACKGROUNDS.values()), dtype=np.float64) / 255
_FG = np.array(list(world.COLOURS.values()), dtype=np.float64) / 255
MIN_CONTRAST = 0.2  # an object must differ from the background by this much (RGB distance, 0..1 scale)
MIN_AREA = 8.0  # pixels
MIN_IOU = 0.5  # the best template must overlap the object at least this much


@dataclass(frozen=True)
class Verdict:
    colour: str  # a world colour, or "none"
    shape: str  # a world shape, or "none"
    background: str
    iou: float  # fit of the chosen shape template

    def matches(self, want: dict[str, str]) -> bool:
        """Whether every attribute in `want` ({"colour": .., "shape": .., "background": ..}) is what was seen."""
        return all(getattr(self, k) == v for k, v in want.items())


def _templates(cx: float, cy: float, area: float) -> dict[str, np.ndarray]:
    # Each shape's half-extent r from its area (see world.shape_mask), and its centre from its centroid.
    out = {}
    r = math.sqrt(area / math.pi)
    out["circle"] = world.shape_mask("circle", cx, cy, r, ss=2)
    out["square"] = world.shape_mask("square", cx, cy, math.sqrt(area) / 2 / 0.85, ss=2)
    r = math.sqrt(area / 1.75)  # triangle area = base half-width r × height 1.75 r
    # The centroid of the triangle lies 2/3 of the height below the apex: apex = cy_c - 2/3·1.75r = cy - r.
    out["triangle"] = world.shape_mask("triangle", cx, cy - 1.75 * r * 2 / 3 + r, r, ss=2)
    r = math.sqrt(area / (math.pi * (1 - 0.55 ** 2)))
    out["ring"] = world.shape_mask("ring", cx, cy, r, ss=2)
    return out


def judge(image) -> Verdict:
    """Judge one image: a uint8 array [H, W, 3] (or a PIL image) of the toy world's size."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64) / 255
    if img.shape[:2] != (world.SIZE, world.SIZE):
        from PIL import Image

        img = np.asarray(Image.fromarray((img * 255).round().astype(np.uint8)).resize(
            (world.SIZE, world.SIZE), Image.Resampling.BOX), dtype=np.float64) / 255
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = list(world.BACKGROUNDS)[int(np.argmin(((_BG - bg_rgb) ** 2).sum(1)))]
    d = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    dmax = float(d.max())
    if dmax < MIN_CONTRAST:
        return Verdict("none", "none", background, 0.0)
    mask = d > dmax / 2
    area = float(mask.sum())
    if area < MIN_AREA:
        return Verdict("none", "none", background, 0.0)
    core = d > 0.75 * dmax
    fg_rgb = img[core].mean(0)
    colour = list(world.COLOURS)[int(np.argmin(((_FG - fg_rgb) ** 2).sum(1)))]
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    m = mask.astype(np.float64)
    best, best_iou = "none", 0.0
    for shape, t in _templates(cx, cy, area).items():
        iou = float(np.minimum(m, t).sum() / np.maximum(m, t).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    if best_iou < MIN_IOU:
        best = "none"
    return Verdict(colour, best, background, best_iou)


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A render made to look like a small diffusion model's output: blurred, noisy, colour-shifted."""
    from PIL import Image, ImageFilter

    x = Image.fromarray(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    a = np.asarray(x, dtype=np.float64)
    a = a + rng.normal(0, rng.uniform(2, 12), a.shape) + rng.normal(0, 12, (1, 1, 3))
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def accuracy_on_renders(n: int = 600, seed: int = 10_000_000, degraded: bool = False,
                        combos=None) -> dict[str, float]:
    """The judge's accuracy (colour, shape, background, all three) on `n` renders of held-out seeds.

    Seeds from 10,000,000 up are never used by pretraining (which draws seeds below 10,000,000). By default
    every colour × shape of the world is drawn, the held-out ones included."""
    combos = combos or tuple((c, s) for s in world.SHAPES for c in world.COLOURS)
    rng = np.random.default_rng(seed)
    hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
    for i in range(n):
        scene = world.sample_scene(seed + i, combos)
        img = world.render(scene)
        if degraded:
            img = degrade(img, rng)
        v = judge(img)
        ok = {"colour": v.colour == scene.colour, "shape": v.shape == scene.shape,
              "background": v.background == scene.background}
        for k, good in ok.items():
            hits[k] += good
        hits["all"] += all(ok.values())
    return {k: v / n for k, v in hits.items()}
