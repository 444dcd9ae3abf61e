"""Public architecture configs, used to build real models on the meta device and to scale down tiny ones."""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).parent


def load_config(arch: str, component: str) -> dict:
    """The public config of `component` ("unet", "text_encoder", "vae", "scheduler") of `arch` ("sd15")."""
    return json.loads((_HERE / arch / f"{component}.json").read_text())


def meta_model(arch: str, component: str):
    """Build the real-size `component` of `arch` on the meta device: real module names and shapes, no memory."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = load_config(arch, component)
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel.from_config(cfg)
        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**cfg))
    raise ValueError(f"no meta builder for {arch}/{component}")
