"""The weight delta ΔW of an adapter module: pure tensor functions, the one place sdlora computes it.

W = W0 + scale · ΔW with scale = alpha / rank (alpha missing or 0: scale 1, as kohya, ComfyUI and A1111 read it).
"""

from __future__ import annotations

import torch


def lora_scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha else float(alpha) / rank


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/r)·up@down in fp32, shaped like the base weight: Linear [out, in], 1x1 conv [out, in, 1, 1], or a kxk
    LoCon conv (down [r, in, k, k], up [out, r, 1, 1]): kohya's `merge_to`,
    conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), i.e. up applied over down's output channels."""
    r = down.shape[0]
    scale = lora_scale(alpha, r)
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        d = torch.nn.functional.conv2d(down.float().permute(1, 0, 2, 3), up.float()).permute(1, 0, 2, 3)
        return d * scale
    d = up.reshape(up.shape[0], r).float() @ down.reshape(r, -1).float()
    if down.dim() == 4:
        d = d.reshape(up.shape[0], down.shape[1], 1, 1)
    return d * scale


def lora_delta_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """The shape of the base weight a (down, up) pair adapts."""
    if down.dim() == 4:
        return (up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return (up.shape[0], down.shape[1])
