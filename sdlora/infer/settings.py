"""One typed record of what a generation is asked for, as `TrainConfig` is for training.

Each field carries its help, its flag, its widget and its checks: `sdlora generate`'s flags are generated from the
fields (`add_flags`, `from_flags`), app.py builds its widgets from them (`widget`), every value is checked in one
place (`check`, with the limits of sdlora/bounds.py), and `image_params` writes the A1111 `parameters` of each PNG.
Importing this module imports nothing heavy (the command line builds its parser from it).
"""

from __future__ import annotations

import argparse
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields

from sdlora import bounds
from sdlora.errors import SdloraError
from sdlora.formats.a1111 import ImageParams, LoraRef
from sdlora.train.option_checks import MAX_CLIP_SKIP

# --scheduler value -> (diffusers class, extra config, A1111 sampler name written into the PNG)
SCHEDULERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    # rectified-flow models (SD 3.x, FLUX.1) sample with their own flow-matching Euler, whatever is chosen
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
}
DEFAULT_SCHEDULER = "dpm++2m"
# the app's strength sliders (minimum, maximum, step): A1111 users' range; bounds.strength refuses past ±MAX_STRENGTH
STRENGTH_RANGE = (-2.0, 2.0, 0.05)


def parse_size(text: str) -> tuple[int, int]:
    """`512` or `512x768` (width x height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise SdloraError(f"--size {text}: use WIDTHxHEIGHT, e.g. 512x768, or one number for a square")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def _f(default, help: str, **kw):
    """A field with its metadata. help: the flag's help (its default is added); metavar; flag: the flag's name when
    it is not the field's (two fields may share one); flag_default: the flag's default when it differs from the
    field's (None: decided once the model is loaded); from_flag: the field's value from the flag's text; label,
    elem_id, range (minimum, maximum, step: a slider), lines (a text box), choices: the app's widget."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Settings:
    """What one `generate` call or app request makes: image i of `num_images` uses seed + i."""

    prompt: str = _f(MISSING, "the prompt (add the adapters' trigger words yourself)", metavar="TEXT",
                     label="Prompt", lines=2)
    negative: str = _f("", "negative prompt", metavar="TEXT", label="Negative prompt", lines=1)
    seed: int = _f(0, "seed of the first image; image i uses seed+i", metavar="N", label="Seed (-1: random)")
    steps: int = _f(20, "sampling steps", metavar="N", label="Steps", range=(1, 100, 1))
    guidance: float = _f(7.0, "guidance scale (default: 7; FLUX.1: 3.5, its distilled guidance)", metavar="CFG",
                         flag_default=None, label="Guidance (CFG; FLUX.1: distilled guidance)", range=(0, 20, 0.5))
    scheduler: str = _f(DEFAULT_SCHEDULER, f"sampler (default: {DEFAULT_SCHEDULER}; SD 3.x and FLUX.1 always use "
                        "flow-euler)", choices=tuple(SCHEDULERS), label="Scheduler")
    # None: the model's native resolution; one flag, --size WxH, sets both
    width: int | None = _f(None, "WIDTHxHEIGHT or one number (default: the model's native resolution)",
                           flag="size", metavar="WxH", from_flag=lambda text: parse_size(text)[0] if text else None,
                           label="Width", range=(8, 1536, 8))
    height: int | None = _f(None, "", flag="size", from_flag=lambda text: parse_size(text)[1] if text else None,
                            label="Height", range=(8, 1536, 8))
    num_images: int = _f(1, "images to make", metavar="N", label="Images", elem_id="num-images", range=(1, 8, 1))
    clip_skip: int | None = _f(None, "clip skip as A1111 and kohya count it (`sdlora train --clip-skip`): condition on "
                               "the CLIP text encoder's N-th layer from the end (1: the last, 2: the penultimate, "
                               "SDXL's and SD 3.x's own); 0 or default: the model's own, or the run's for a model "
                               "fresh from training", metavar="N", label="Clip skip (0: the model's own)",
                               elem_id="clip-skip")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Types, then values: one-line SdloraErrors naming the setting and the fix."""
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), field_type(f), f.default is None))
        if self.scheduler not in SCHEDULERS:
            raise SdloraError(f"unknown scheduler '{self.scheduler}'; use one of: {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise SdloraError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise SdloraError(f"the number of images must be at least 1, got {self.num_images}")
        if not math.isfinite(self.guidance):
            raise SdloraError(f"guidance must be a finite number, got {self.guidance}")
        for v in (self.width, self.height):
            if v is not None and (v < 8 or v % 8):
                raise SdloraError(f"image size must be a positive multiple of 8, got {v}")
        if self.width is not None or self.height is not None:
            bounds.image_size(self.width or self.height, self.height or self.width)
        bounds.at_most("steps", self.steps, bounds.MAX_SAMPLE_STEPS, "20-50 steps are usual")
        bounds.at_most("the number of images", self.num_images, bounds.MAX_IMAGES, "make them in several runs")
        if self.clip_skip == 0:  # the app's number box when left alone
            self.clip_skip = None
        if self.clip_skip is not None and not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise SdloraError(f"clip skip must be between 1 and {MAX_CLIP_SKIP} (1: the last layer; 0: the model's "
                              f"own), got {self.clip_skip}")
        if not 0 <= self.seed < bounds.MAX_IMAGE_SEED:
            raise SdloraError(f"seed must be between 0 and 2^63-1, got {self.seed}")

    def image_params(self, i: int, model: str, loras: list[LoraRef], extra: dict[str, str]) -> ImageParams:
        """The A1111 `parameters` of image i, for settings whose size and scheduler the model has settled."""
        skip = {"Clip skip": str(self.clip_skip)} if self.clip_skip is not None else {}  # A1111 writes it so
        return ImageParams(prompt=self.prompt, negative=self.negative, steps=self.steps,
                           sampler=SCHEDULERS[self.scheduler][2], cfg=self.guidance, seed=self.seed + i,
                           width=self.width, height=self.height, model=model, loras=loras, extra=skip | dict(extra))

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Settings:
        """The record of `sdlora generate`'s flags (add_flags); a flag left out takes the field's default."""
        values = {}
        for f in fields(cls):
            given = getattr(args, _dest(f))
            if given is not None:
                values[f.name] = f.metadata["from_flag"](given) if "from_flag" in f.metadata else given
        return cls(**values)


def field_type(f) -> type:
    """int, float, str or bool: a field's type without its `| None`."""
    t = eval(f.type, {}) if isinstance(f.type, str) else f.type  # the annotations are strings (__future__)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _typed(name: str, v, t: type, may_be_none: bool):
    """`v` as a `t`: a whole float (a widget's 20.0) is an int, an int a float; anything else is refused."""
    if v is None and may_be_none:
        return v
    if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if t is int and isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, t) and not (t is int and isinstance(v, bool)):
        return v
    what = {int: "a whole number", float: "a number", str: "text"}[t]
    raise SdloraError(f"{name.replace('_', ' ')} must be {what}, got {v!r}")


def _dest(f) -> str:
    return f.metadata.get("flag", f.name)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`--field-name`, or the flag fields share), with the field's help, type and default."""
    from sdlora.cli import _with_default  # the train flags' "(default: X)" rule, here too

    seen = set()
    for f in fields(Settings):
        dest = _dest(f)
        if dest in seen:
            continue
        seen.add(dest)
        required = f.default is MISSING
        help_ = f.metadata["help"]
        if required:
            help_ = f"required: {help_}"
        elif f.default not in (None, "") and "flag_default" not in f.metadata:
            help_ = _with_default(help_, f.default)
        t = str if "from_flag" in f.metadata else field_type(f)
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {"metavar": f.metadata.get("metavar")}
        default = None if required or "flag_default" in f.metadata or "from_flag" in f.metadata else f.default
        parser.add_argument("--" + dest.replace("_", "-"), type=t, default=default, required=required, help=help_,
                            **kw)


def widget(name: str) -> dict:
    """How app.py shows field `name`: kind (text, number, slider, choice) and the keyword arguments of its widget
    (label, elem_id, value and its range, choices, lines)."""
    f = next(f for f in fields(Settings) if f.name == name)
    m = f.metadata
    kw = {"label": m["label"], "elem_id": m.get("elem_id", name)}
    if f.default is not MISSING and f.default is not None:
        kw["value"] = f.default
    if "choices" in m:
        return {"kind": "choice", **kw, "choices": list(m["choices"])}
    if "range" in m:
        lo, hi, step = m["range"]
        return {"kind": "slider", **kw, "minimum": lo, "maximum": hi, "step": step}
    if field_type(f) is str:
        return {"kind": "text", **kw, "lines": m.get("lines", 1)}
    return {"kind": "number", **kw, "precision": 0 if field_type(f) is int else None}
