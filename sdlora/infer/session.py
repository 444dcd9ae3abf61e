"""A loaded base model with its adapters: what `sdlora generate` and app.py both drive, so both give the same image
for the same settings."""

from __future__ import annotations

import dataclasses
import threading

import torch

import sdlora
from sdlora import archs
from sdlora.errors import SdloraError
from sdlora.formats.a1111 import LoraRef
from sdlora.formats.adapter import AdapterFile
from sdlora.formats.read import read_adapter
from sdlora.infer.blend import Blender, Resolved
from sdlora.infer.settings import DEFAULT_SCHEDULER, SCHEDULERS, Settings  # noqa: F401 (their home before)
from sdlora.infer.text import prompt_args
from sdlora.lora.tokens import pipeline_prompts
from sdlora.models import BUILTIN_MODELS, load_base, model_arch, model_identity


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
        with self.lock:
            self.blender.set_strengths(strengths)
            model_name, model_hash = self.identity
            extra = ({"Model hash": model_hash} if model_hash else {}) | {"Version": f"sdlora {sdlora.__version__}"}
            loras = [LoraRef(r.file.name, te, u, r.file.short_hash) for r, te, u in self.blender.active()]
            # what the model settles: its native size where none is asked, the sampler its family uses
            s = dataclasses.replace(settings, width=settings.width or base.native_resolution,
                                    height=settings.height or base.native_resolution,
                                    scheduler=sampler_for(base.spec, settings.scheduler))
            with self.blender.tokens():  # learnt tokens bundled with the adapters (pivotal tuning)
                pipe = base.pipeline(scheduler=make_scheduler(s.scheduler, base.scheduler_config))
                text = pipeline_prompts(pipe, base.spec, base.tokenizers, s.prompt,
                                        (s.negative or None) if base.spec.negative_prompt else None)
                # the prompt at the layer `sdlora train --clip-skip` conditions on (and a fresh run's chunks)
                call = prompt_args(base, s.prompt, text.get("negative_prompt"), s.clip_skip, text)
                call |= base.generation_kwargs()  # T5 tokens: as many as training encodes
                out = []
                for i in range(s.num_images):
                    pipe.set_progress_bar_config(disable=not progress, desc=f"image {i + 1}/{s.num_images}",
                                                 unit="step")
                    image = pipe(**call, num_inference_steps=s.steps, guidance_scale=s.guidance, width=s.width,
                                 height=s.height, generator=torch.Generator("cpu").manual_seed(s.seed + i),
                                 output_type="pil").images[0]
                    out.append((image, s.image_params(i, model_name, loras, extra)))
            return out
