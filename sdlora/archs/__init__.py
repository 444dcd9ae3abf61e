"""The architecture registry: one `ArchSpec` per model family, and the public configs of the real models.

`get("sdxl")` is the spec; `SPECS` lists them all. Folders `sd15` (SD 1.5), `sd21` (SD 2.1, 768-v), `sdxl`
(SDXL base 1.0), `sd35` (SD 3.5 Medium; `transformer_large.json`: 3.5 Large) and `flux1` (FLUX.1-dev;
`*_schnell.json`: schnell) hold the diffusers configs of the UNet, text encoder(s), VAE and scheduler exactly as the \
public
repositories ship them (see their README), used to build the real models on the meta device and to scale down
the tiny ones.

A new family: a spec module beside sd1.py (plus its config folder), one line in `SPECS` below, its key-name maps
in sdlora/formats/, and tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.archs import flux, sd1, sd2, sd3, sdxl
from sdlora.archs.spec import ArchSpec, TextEncoderSpec
from sdlora.errors import SdloraError

__all__ = ["ArchSpec", "TextEncoderSpec", "SPECS", "IDS", "get", "label", "fits", "load_config", "meta_model",
           "meta_components", "PUBLIC_MODELS"]

_HERE = Path(__file__).parent

SPECS: dict[str, ArchSpec] = {s.id: s for s in (sd1.SPEC, sd2.SPEC, sdxl.SPEC, sd3.SPEC, flux.SPEC)}
IDS = tuple(SPECS)

# hub id -> (family, variant of its denoiser's config file here): the models `sdlora plan` can size with no download
PUBLIC_MODELS = {
    "black-forest-labs/FLUX.1-dev": ("flux", ""),
    "black-forest-labs/FLUX.1-schnell": ("flux", "schnell"),
    "stabilityai/stable-diffusion-3.5-large": ("sd3", "large"),
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", ""),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", ""),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd1", ""),
    "stabilityai/stable-diffusion-2-1": ("sd2", ""),
}


def get(arch: str | ArchSpec) -> ArchSpec:
    """The spec of `arch` ("sd1", "sd2", "sdxl"; a spec passes through)."""
    if isinstance(arch, ArchSpec):
        return arch
    try:
        return SPECS[arch]
    except KeyError:
        raise SdloraError(f"unknown architecture {arch!r}; sdlora knows {', '.join(SPECS)}") from None


def label(arch: str | None) -> str:
    """What messages call `arch` ("SD 1.x"); unknown ids pass through."""
    return SPECS[arch].label if arch in SPECS else str(arch)


def fits(adapter_arch: str | None, model_arch: str) -> bool:
    """Can an adapter made for `adapter_arch` (None: unknown) apply to a model of `model_arch`?"""
    return adapter_arch is None or adapter_arch == model_arch


def _dir(arch: str) -> str:
    return SPECS[arch].config_dir if arch in SPECS else arch


def load_config(arch: str, component: str) -> dict:
    """The public config of `component` ("unet", "transformer", "text_encoder", "text_encoder_2", "vae",
    "scheduler", or a variant's file such as "transformer_large") of `arch` ("sd1"/"sd15", "sd2"/"sd21", "sdxl",
    "sd3"/"sd35", "flux"/"flux1")."""
    return json.loads((_HERE / _dir(arch) / f"{component}.json").read_text())


def build(cfg: dict):
    """A randomly initialised model from a public config: diffusers' `_class_name`, or transformers' `architectures`."""
    if "_class_name" in cfg:
        import diffusers

        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    import transformers

    cls = getattr(transformers, cfg["architectures"][0])
    return cls(transformers.AutoConfig.for_model(**cfg))


def meta_model(arch: str, component: str, variant: str = ""):
    """Build the real-size `component` of `arch` on the meta device: real module names and shapes, no memory.

    `component` is a diffusers component ("unet", "text_encoder", "text_encoder_2", "vae") or a kohya one
    ("te", "te1", "te2"); `variant` picks another config file of it ("large": `transformer_large.json`)."""
    import torch

    spec = SPECS.get(arch) or next(s for s in SPECS.values() if s.config_dir == arch)
    component = spec.components.get(component, component)
    with torch.device("meta"):
        return build(load_config(spec.id, component + (f"_{variant}" if variant else "")))


def meta_components(arch: str) -> dict:
    """{kohya component: real-size meta model} of `arch` ("sd1", "sd2", "sdxl")."""
    return {k: meta_model(arch, d) for k, d in get(arch).components.items()}
