"""Save a trained adapter as a kohya-format file."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.formats import io, kohya, meta
from sdlora.lora.inject import collect

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kohya_tensors(components: dict[str, torch.nn.Module], dtype: torch.dtype = torch.float32,
                  arch: str = "sd1") -> dict[str, torch.Tensor]:
    """kohya tensors of every LoRA layer of `components` ({"unet": .., "te": ..} or te1/te2 for SDXL), cast to
    `dtype` (alpha too, as kohya does), named as kohya names them for `arch`."""
    out: dict[str, torch.Tensor] = {}
    for component, model in components.items():
        for name, (down, up, alpha, is_conv) in collect(model).items():
            for k, t in kohya.pack(component, name, down, up, alpha, conv=is_conv, arch=arch).items():
                out[k] = t.to(dtype)
    return out


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write `tensors` atomically with `metadata` and kohya's `sshs_*` hashes."""
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = meta.addnet_hashes(tensors, metadata)
    io.atomic_save(tensors, Path(path), metadata)
    return Path(path)
