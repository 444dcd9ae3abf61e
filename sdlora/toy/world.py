"""The toy world: captioned 32-pixel images of one coloured shape on a plain background, rendered from a seed.

Vocabulary (every word is one token of the toy tokenizer):

    colours      red green blue yellow purple
    shapes       circle square triangle ring
    backgrounds  black white gray

A scene is (colour, shape, background) plus a position and size that captions never mention (so the
model must draw the object anywhere, at any of a range of sizes). Captions are regular:
"a red circle on a black background"; pretraining also sees shorter forms ("a red circle",
"a circle on a black background", "a circle") and the empty caption, so class prompts such as
"a triangle" and classifier-free guidance work.

Held out of pretraining (what DreamBooth teaches):
  * the combination purple × triangle (`HELD_OUT_COMBOS`): the base knows "purple" and "triangle" but has
    never seen a purple triangle; the toy DreamBooth subject is "sks triangle" = a purple triangle;
  * the shape "ring" (`HELD_OUT_SHAPES`): never drawn in pretraining at all.

Rendering is anti-aliased (4× supersampling, box-filtered) and deterministic: `render(scene)` gives the same
bytes on every machine, and `sample_scene(seed)` the same scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 32  # image side in pixels
SS = 4  # supersampling factor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle", "ring")

HELD_OUT_COMBOS = frozenset({("purple", "triangle")})
HELD_OUT_SHAPES = frozenset({"ring"})
SEEN_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
SEEN_COMBOS = tuple((c, s) for s in SEEN_SHAPES for c in COLOURS if (c, s) not in HELD_OUT_COMBOS)

# Size (half-extent in pixels) and centre ranges: the object always lies at least 2 px inside the border, so
# a judge can read the background from the border pixels.
R_MIN, R_MAX = 6.5, 10.0
MARGIN = 2.0

# Words of the vocabulary, in a fixed order (the tokenizer is built from them). "sks" is the usual rare
# DreamBooth trigger: a token that exists but never appears in pretraining captions.
WORDS = ("a", "on", "background") + tuple(COLOURS) + SHAPES + tuple(BACKGROUNDS) + ("sks",)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half-extent, pixels
    jitter: tuple[int, int, int] = (0, 0, 0)  # small per-image colour variation of the object

    def caption(self, colour: bool = True, background: bool = True) -> str:
        return caption(self.colour if colour else None, self.shape, self.background if background else None)


def caption(colour: str | None, shape: str, background: str | None = None) -> str:
    """The world's caption for these attributes: "a red circle on a black background", "a circle", ..."""
    words = ["a"] + ([colour] if colour else []) + [shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption asks for ({"colour":.., "shape":.., "background":..}; absent ones omitted).

    Words outside the vocabulary (a trigger such as "sks") are ignored."""
    words = text.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in SHAPES:
            out["shape"] = w
        elif w in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            out["background"] = w
        elif w in COLOURS:
            out["colour"] = w
    return out


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE, ss: int = SS) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a size×size image by the shape (anti-aliased by supersampling)."""
    n = size * ss
    c = (np.arange(n, dtype=np.float64) + 0.5) / ss
    x, y = c[None, :], c[:, None]
    if shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = 0.85 * r
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":  # pointing up; apex at cy - r, base at cy + 0.75 r, base half-width r
        top, bottom = cy - r, cy + 0.75 * r
        m = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= (y - top) / (bottom - top) * r)
    elif shape == "ring":
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        m = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m.reshape(size, ss, size, ss).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """uint8 RGB image [SIZE, SIZE, 3] of `scene`."""
    m = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)[..., None]
    fg = np.clip(np.array(COLOURS[scene.colour], dtype=np.float64) + np.array(scene.jitter), 0, 255)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    return np.round(m * fg + (1 - m) * bg).astype(np.uint8)


def place(rng: np.random.Generator, colour: str, shape: str, background: str) -> Scene:
    """A scene with these attributes at a random position and size drawn from `rng`."""
    r = float(rng.uniform(R_MIN, R_MAX))
    lo, hi = r + MARGIN, SIZE - r - MARGIN
    cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    jitter = tuple(int(v) for v in rng.integers(-12, 13, size=3))
    return Scene(colour, shape, background, cx, cy, r, jitter)


def sample_scene(seed: int, combos=SEEN_COMBOS) -> Scene:
    """The scene of `seed`: a (colour, shape) from `combos` (default: those seen in pretraining), any background."""
    rng = np.random.default_rng(seed)
    colour, shape = combos[int(rng.integers(len(combos)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return place(rng, colour, shape, background)


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A pretraining caption for `scene`: full (50%), no background (20%), no colour (10%), shape only (10%),
    empty (10%, for classifier-free guidance)."""
    u = rng.random()
    if u < 0.5:
        return scene.caption()
    if u < 0.7:
        return scene.caption(background=False)
    if u < 0.8:
        return scene.caption(colour=False)
    if u < 0.9:
        return scene.caption(colour=False, background=False)
    return ""


def seen_prompts(backgrounds: bool = True) -> list[str]:
    """Captions of every combination seen in pretraining (with each background, or without background)."""
    if not backgrounds:
        return [caption(c, s) for c, s in SEEN_COMBOS]
    return [caption(c, s, b) for c, s in SEEN_COMBOS for b in BACKGROUNDS]


def subject_images(subject: str, folder: str | Path, n: int = 5, seed: int = 20_000_000) -> Path:
    """Render `n` images of a world subject (e.g. "a purple triangle": any background, any position/size)."""
    from PIL import Image

    from sdlora.formats.file_io import save_png

    want = parse_caption(subject)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bgs = list(BACKGROUNDS)
    for i in range(n):
        bg = want.get("background") or bgs[i % len(bgs)]
        scene = place(rng, want["colour"], want["shape"], bg)
        save_png(Image.fromarray(render(scene)), folder / f"{i:02d}.png")
    return folder
