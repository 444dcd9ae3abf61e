"""lokr: LyCORIS's LoKr, ΔW = kron(W1, W2)·scale, W1 the left operand (LyCORIS `make_kron`, A1111, ComfyUI).

Roles: w1 or (w1a, w1b); w2 or (w2a, w2b), with t2 for Tucker (then w2a [r, b], w2b [r, d]). scale = alpha/r with
r = w2b's rows, else w1b's; 1 when both factors are full (every loader ignores alpha then). Trained with PEFT's
`LoKrConfig`: the same factorisation (`factorization`), kron order and shapes as LyCORIS; one difference: with both
factors full PEFT still scales by alpha/r where every loader uses 1, so that scale is folded into W1 when collecting
and alpha is written = r (what LyCORIS writes there).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from sdlora.lora.kinds.base import ADAPTER, KindSpec, lora_scale, peft_roles, tucker

if TYPE_CHECKING:
    import torch


def lokr_factors(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) of a LoKr module, fp32."""
    w1 = t["w1"].float() if "w1" in t else t["w1a"].float() @ t["w1b"].float()
    if "w2" in t:
        w2 = t["w2"].float()
    elif "t2" in t:
        w2 = tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        w2 = t["w2a"].float() @ t["w2b"].float()
    return w1, w2


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The r of alpha/r: w2b's rows, else w1b's; None when both factors are full (every loader then uses scale 1)."""
    if "w2b" in t:
        return int(t["w2b"].shape[0])
    if "w1b" in t:
        return int(t["w1b"].shape[0])
    return None


def lokr_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """scale·kron(W1, W2) with W1 the left operand (LyCORIS `make_kron`, A1111, ComfyUI); W1 is unsqueezed to
    [a, c, 1, 1] for a 4-D W2. scale = alpha/r, or 1 when both factors are full (A1111, ComfyUI, diffusers)."""
    import torch

    w1, w2 = lokr_factors(t)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    r = lokr_rank(t)
    return torch.kron(w1.contiguous(), w2.contiguous()) * (1.0 if r is None else lora_scale(alpha, r))


@functools.cache
def _layer_type():
    from peft.tuners.lokr import LoKrLayer

    return LoKrLayer


class LoKr(KindSpec):
    def rank(self, t):
        return lokr_rank(t)

    def shape(self, t):
        w1 = t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
        if "w2" in t:
            w2 = tuple(t["w2"].shape)
        elif "t2" in t:
            w2 = (t["w2a"].shape[1], t["w2b"].shape[1], *t["t2"].shape[2:])
        else:
            w2 = (t["w2a"].shape[0], t["w2b"].shape[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def delta(self, t, alpha):
        return lokr_delta(t, alpha)

    def missing(self, t):
        whole = ("w1" in t or {"w1a", "w1b"} <= set(t)) and ("w2" in t or {"w2a", "w2b"} <= set(t))
        return [] if whole else ["w1 and w2 factors"]

    def inject(self, model, where, net):
        from peft import LoKrConfig, inject_adapter_in_model

        config = LoKrConfig(r=where.rank, alpha=where.alpha, init_weights=True, use_effective_conv2d=False,
                            decompose_factor=net.factor, **where.peft_patterns())
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)

    def layer_of(self, module):
        return module if isinstance(module, _layer_type()) and ADAPTER in module.lokr_w1_a | module.lokr_w1 else None

    def collect(self, layer):
        t = peft_roles({"w1": layer.lokr_w1, "w1a": layer.lokr_w1_a, "w1b": layer.lokr_w1_b, "w2": layer.lokr_w2,
                    "w2a": layer.lokr_w2_a, "w2b": layer.lokr_w2_b, "t2": layer.lokr_t2})
        alpha, r = float(layer.alpha[ADAPTER]), layer.r[ADAPTER]
        if "w1" in t and "w2" in t:  # loaders use scale 1 here: fold PEFT's alpha/r into W1, write alpha = r
            t["w1"] = t["w1"] * (alpha / r)
            alpha = float(r)
        return self.name, t, alpha

    def load(self, layer, t, ratio):
        """The inverse of `collect`: with two full factors its alpha/r was folded into W1, so it is taken out."""
        from sdlora.lora.kinds.lora import _set

        params = {"w1": layer.lokr_w1, "w1a": layer.lokr_w1_a, "w1b": layer.lokr_w1_b, "w2": layer.lokr_w2,
                  "w2a": layer.lokr_w2_a, "w2b": layer.lokr_w2_b, "t2": layer.lokr_t2}
        fold = float(layer.alpha[ADAPTER]) / layer.r[ADAPTER] if "w1" in t and "w2" in t else 1.0
        for role, v in t.items():
            _set(params[role][ADAPTER], v * (ratio / fold) if role in ("w1", "w1a") else v)

    def network_args(self, net):
        return {"factor": str(net.factor)}


SPEC = LoKr("lokr", help="Kronecker", flat_conv=True, trainable=True, convs=True, algo="lokr")
