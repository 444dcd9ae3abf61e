"""Public architecture configs, used to build real models on the meta device and to scale down tiny ones.

Folders: `sd15` (SD 1.5), `sd21` (SD 2.1, 768-v), `sdxl` (SDXL base 1.0); each holds the diffusers configs of
the UNet, text encoder(s), VAE and scheduler exactly as the public repositories ship them (see their README).
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).parent

# sdlora's architecture ids ("sd1", "sd2", "sdxl", as BaseModel.arch) -> config folder.
ARCH_DIRS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
# kohya component name -> diffusers component (config file / pipeline attribute), per architecture.
COMPONENTS = {
    "sd1": {"unet": "unet", "te": "text_encoder"},
    "sd2": {"unet": "unet", "te": "text_encoder"},
    "sdxl": {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"},
}


def _dir(arch: str) -> str:
    return ARCH_DIRS.get(arch, arch)


def load_config(arch: str, component: str) -> dict:
    """The public config of `component` ("unet", "text_encoder", "text_encoder_2", "vae", "scheduler") of `arch`
    ("sd15"/"sd1", "sd21"/"sd2", "sdxl")."""
    return json.loads((_HERE / _dir(arch) / f"{component}.json").read_text())


def meta_model(arch: str, component: str):
    """Build the real-size `component` of `arch` on the meta device: real module names and shapes, no memory.

    `component` is a diffusers component ("unet", "text_encoder", "text_encoder_2", "vae") or a kohya one
    ("te", "te1", "te2")."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch_id = {v: k for k, v in ARCH_DIRS.items()}.get(arch, arch)
    component = COMPONENTS.get(arch_id, {}).get(component, component)
    cfg = load_config(arch, component)
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(cfg)
        if component == "vae":
            return AutoencoderKL.from_config(cfg)
        if component.startswith("text_encoder"):
            cls = CLIPTextModelWithProjection if cfg["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
            return cls(CLIPTextConfig(**cfg))
    raise ValueError(f"no meta builder for {arch}/{component}")


def meta_components(arch: str) -> dict:
    """{kohya component: real-size meta model} of `arch` ("sd1", "sd2", "sdxl")."""
    return {k: meta_model(arch, d) for k, d in COMPONENTS[arch].items()}
