"""loha: LyCORIS's LoHa, ΔW = (W1 ⊙ W2)·alpha/r with Wj = wja @ wjb (or Tucker: tucker(tj, wja, wjb)).

Roles: w1a, w1b, w2a, w2b (plain: [out, r] / [r, in·kh·kw], 2-D even for a conv; Tucker: [r, out] / [r, in] with
t1, t2 [r, r, kh, kw]); r = w1b's rows. Trained with PEFT's `LoHaConfig`, which uses LyCORIS's parameter names,
shapes and scale alpha/r (P `loha/layer.py`), so the trained tensors are written as they are (plain form).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from sdlora.lora.kinds.base import ADAPTER, KindSpec, lora_scale, peft_roles, tucker

if TYPE_CHECKING:
    import torch


def loha_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """(alpha/r)·(W1 ⊙ W2), r = w1b.shape[0]; plain: Wj = wja @ wjb (2-D, reshape to the weight's shape is the
    caller's), Tucker: Wj = tucker(tj, wja, wjb) (4-D)."""
    if "t1" in t:
        d = tucker(t["t1"], t["w1a"], t["w1b"]) * tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        d = (t["w1a"].float() @ t["w1b"].float()) * (t["w2a"].float() @ t["w2b"].float())
    return d * lora_scale(alpha, t["w1b"].shape[0])


@functools.cache
def _layer_type():
    from peft.tuners.loha import LoHaLayer

    return LoHaLayer


class LoHa(KindSpec):
    def rank(self, t):
        return int(t["w1b"].shape[0])

    def shape(self, t):
        if "t1" in t:
            return (t["w1a"].shape[1], t["w1b"].shape[1], *t["t1"].shape[2:])
        return (t["w1a"].shape[0], t["w1b"].shape[1])

    def delta(self, t, alpha):
        return loha_delta(t, alpha)

    def inject(self, model, where, net):
        from peft import LoHaConfig, inject_adapter_in_model

        config = LoHaConfig(r=where.rank, alpha=where.alpha, init_weights=True, use_effective_conv2d=False,
                            **where.peft_patterns())
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)

    def layer_of(self, module):
        return module if isinstance(module, _layer_type()) and ADAPTER in module.hada_w1_a else None

    def collect(self, layer):
        t = peft_roles({"w1a": layer.hada_w1_a, "w1b": layer.hada_w1_b, "w2a": layer.hada_w2_a, "w2b": layer.hada_w2_b,
                    "t1": layer.hada_t1, "t2": layer.hada_t2})
        return self.name, t, float(layer.alpha[ADAPTER])

    def load(self, layer, t, ratio):
        from sdlora.lora.kinds.lora import _set

        params = {"w1a": layer.hada_w1_a, "w1b": layer.hada_w1_b, "w2a": layer.hada_w2_a, "w2b": layer.hada_w2_b,
                  "t1": layer.hada_t1, "t2": layer.hada_t2}
        for role, v in t.items():
            _set(params[role][ADAPTER], v * ratio if role == "w1a" else v)


SPEC = LoHa("loha", help="Hadamard", roles=("w1a", "w1b", "w2a", "w2b"), flat_conv=True, trainable=True, convs=True,
            algo="loha")
