"""Reference formulas written here, independently of sdlora's code, for tests to compare against."""

from __future__ import annotations

import torch


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha) -> torch.Tensor:
    """(alpha / r) · up @ down in float64 for Linear and 1x1 convs; for a kxk conv (LoCon: down [r, in, k, k],
    up [out, r, 1, 1]) the delta's [o, i, y, x] is Σ_r up[o, r] · down[r, i, y, x]. alpha None or 0: scale 1."""
    r = down.shape[0]
    alpha = float(alpha) if alpha is not None else 0.0
    scale = alpha / r if alpha else 1.0
    u = up.double().reshape(up.shape[0], r)
    if down.dim() == 4:
        return scale * torch.einsum("or,riyx->oiyx", u, down.double())
    return scale * torch.einsum("or,ri->oi", u, down.double())


def group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya state dict by module, split here by its key suffixes: {module: {"lora_down.weight": .., ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            if key.endswith("." + suffix):
                out.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
                break
        else:
            out.setdefault("", {})[key] = t
    return out
