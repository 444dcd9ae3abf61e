"""A loaded base model with its adapters: what `sdlora generate` and app.py both drive, so both give the same image
for the same settings."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

import sdlora
from sdlora import archs, bounds
from sdlora.errors import SdloraError
from sdlora.formats.a1111 import ImageParams, LoraRef
from sdlora.formats.adapter import AdapterFile
from sdlora.formats.read import read_adapter
from sdlora.infer.blend import Blender, Resolved
from sdlora.models import BUILTIN_MODELS, load_base, model_arch, model_identity

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


@dataclass
class Settings:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = DEFAULT_SCHEDULER
    width: int | None = None  # None: the model's native resolution
    height: int | None = None
    num_images: int = 1

    def check(self) -> None:
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
        if not 0 <= self.seed < 2**63:
            raise SdloraError(f"seed must be between 0 and 2^63-1, got {self.seed}")


def refuse_misfits(files: list[AdapterFile], model: str) -> None:
    """Before `model` loads: refuse an adapter made for another family (or for another built-in model, whose widths
    differ), naming the model it was made for. Models whose family only loading tells (hub ids) pass here and are
    checked when the adapter is matched."""
    arch = model_arch(model)
    for f in files:
        where = f.path.name if f.path else f.name
        made_for = f.metadata.get("ss_sd_model_name") or ""
        if arch is not None and not archs.fits(f.arch, arch):
            named = f" (trained on '{made_for}')" if made_for else ""
            raise SdloraError(f"{where}: this adapter is for {archs.label(f.arch)}{named}, the model '{model}' is "
                              f"{archs.label(arch)}; pass "
                              f"{'--model ' + made_for if made_for else 'a model of its family'}"
                              f" or an adapter trained for '{model}'")
        if made_for in BUILTIN_MODELS and model in BUILTIN_MODELS and made_for != model:
            raise SdloraError(f"{where}: this adapter was trained on the built-in model '{made_for}', not '{model}' "
                              f"(their widths differ); pass --model {made_for}")


def sampler_for(spec, name: str) -> str:
    """The --scheduler value a family samples with: `name`, except that rectified-flow families (SD 3.x, FLUX.1)
    always use their flow-matching Euler sampler (the others are ε/v samplers)."""
    if spec.objective == "flow":
        return next(k for k, (cls, _, _) in SCHEDULERS.items() if cls == spec.sampler)
    if SCHEDULERS[name][0] == "FlowMatchEulerDiscreteScheduler":
        raise SdloraError(f"--scheduler {name} is for SD 3.x / FLUX.1 models; pick another for {spec.label}")
    return name


def make_scheduler(name: str, config: dict):
    import diffusers

    cls, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(dict(config), **extra)


class Session:
    """A loaded base model with its adapters: what `sdlora generate` and app.py both drive. Thread-safe."""

    def __init__(self, model: str = "tiny", base=None):
        self.base = base if base is not None else load_base(model)
        self.blender = Blender(self.base)
        self.lock = threading.RLock()
        self.identity = model_identity(self.base.name)  # (Model, Model hash) for the PNGs: hashed once per load

    def use_model(self, model: str, files: list[AdapterFile] | None = None) -> list[Resolved | SdloraError]:
        """Switch the base model (a no-op for the loaded one) and match `files` to it, from memory (default: the
        adapters added so far). Returns, per file, its match or why it does not fit this model; the ones that fit
        are the session's adapters now. If the model cannot be loaded, the session keeps the one it had."""
        with self.lock:
            if files is None:
                files = [r.file for r in self.blender.adapters.values()]
            self.blender.set_strengths({})  # the model's own weights again before another blend is matched
            if model != self.base.name:
                self.base = load_base(model)
                self.identity = model_identity(self.base.name)
            self.blender = Blender(self.base)
            return self.fit(files)

    def fit(self, files: list[AdapterFile]) -> list[Resolved | SdloraError]:
        """Add each of `files` that fits the model (under its file name, made unique); the others' reasons."""
        out = []
        with self.lock:
            for f in files:
                f.name = f.file_name
                try:
                    out.append(self.blender.add(f))
                except SdloraError as e:
                    out.append(e)
        return out

    def add(self, path) -> Resolved:
        """Read an adapter file (once) and match it to the model; raises SdloraError when it does not fit."""
        f = read_adapter(path)
        with self.lock:
            return self.blender.add(f)

    def generate(self, settings: Settings, strengths: dict[str, float | tuple[float, float]],
                 progress: bool = False):
        """Images for `settings` with the blend `strengths`: [(PIL image, ImageParams)], image i with seed+i.
        With `progress`, each image's denoising steps show as a bar labelled "image i/N"."""
        settings.check()
        base = self.base
        width = settings.width or base.native_resolution
        height = settings.height or base.native_resolution
        with self.lock:
            self.blender.set_strengths(strengths)
            model_name, model_hash = self.identity
            extra = ({"Model hash": model_hash} if model_hash else {}) | {"Version": f"sdlora {sdlora.__version__}"}
            loras = [LoraRef(r.file.name, te, u, r.file.short_hash) for r, te, u in self.blender.active()]
            sampler = sampler_for(base.spec, settings.scheduler)
            pipe = base.pipeline(scheduler=make_scheduler(sampler, base.scheduler_config))
            call = {"negative_prompt": settings.negative or None} if base.spec.negative_prompt else {}
            call |= base.generation_kwargs()  # T5 tokens: as many as training encodes
            out = []
            n = settings.num_images
            for i in range(n):
                pipe.set_progress_bar_config(disable=not progress, desc=f"image {i + 1}/{n}", unit="step")
                seed = settings.seed + i
                image = pipe(prompt=settings.prompt, **call, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                             width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed),
                             output_type="pil").images[0]
                params = ImageParams(prompt=settings.prompt, negative=settings.negative, steps=settings.steps,
                                     sampler=SCHEDULERS[sampler][2], cfg=settings.guidance, seed=seed,
                                     width=width, height=height, model=model_name, loras=loras,
                                     extra=dict(extra))
                out.append((image, params))
            return out
