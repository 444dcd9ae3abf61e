"""dora: DoRA (weight-decomposed LoRA), a down/up pair plus a magnitude (the DoRA scale).

W' = D(W0 + scale·ΔW): the base plus the pair's ΔW, renormalised and rescaled by the magnitude (`dora_delta`).
A magnitude may ride on any kind (`AdapterModule.dora`); a lora/locon module that carries one is of kind "dora".
Trained as `--dora` on `--network lora|locon`. PEFT's DoRA keeps one magnitude per *output* channel, which A1111
misapplies and ComfyUI applies with the base weight's norm; the orientation both read correctly is per *input*
channel, [1, in(, 1, 1)], which only LyCORIS trains: its `LoConModule(weight_decompose=True, wd_on_out=False)`
(the `lycoris-lora` package, the format's reference implementation) is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdlora.errors import SdloraError
from sdlora.lora.kinds.lora import PairKind

if TYPE_CHECKING:
    import torch

DORA_ATTR = "sdlora_dora"  # the LyCORIS DoRA module's attribute on the layer it adapts


def dora_delta(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """D(W + ΔW) − W, the DoRA update A1111 (`apply_weight_decompose`) and ComfyUI (`weight_decompose`) fuse
    (W' = W + m·(D(X) − W)), with ΔW already scaled. D(X) = magnitude · X / ‖X‖, the norm taken per input channel
    for a [1, in(, 1, 1)] magnitude (A1111's only form, LyCORIS wd_on_output=False), per output channel for
    [out, 1(, 1, 1)] (LyCORIS ≥ 2025-04). The norm is of X = W + ΔW, as LyCORIS and A1111 take it."""
    w = base.float()
    x = w + delta.reshape(w.shape)
    mag = magnitude.float()
    if mag.shape[0] == 1 and mag.numel() == w.shape[1]:  # per input channel
        norm = x.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    else:  # per output channel
        norm = x.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    return mag.reshape(norm.shape) * x / norm - w


class DoRA(PairKind):
    def inject(self, model, where, net):
        try:
            from lycoris.modules.locon import LoConModule
        except ImportError as e:
            raise SdloraError("--dora trains with LyCORIS's DoRA (a per-input-channel DoRA scale, what A1111 and "
                              "ComfyUI read): pip install lycoris-lora") from e
        for name in where.names:
            layer = model.get_submodule(name)
            r, a = where.rank_alpha(name)
            m = LoConModule(name, layer, multiplier=1.0, lora_dim=r, alpha=a, weight_decompose=True, wd_on_out=False)
            m.apply_to()
            layer.add_module(DORA_ATTR, m)  # its parameters become the model's (optimizer, checkpoints, .to())

    def layer_of(self, module):
        return getattr(module, DORA_ATTR, None)

    def collect(self, layer):
        """What LyCORIS's `custom_state_dict` saves, by role (read from the module: its keys are kohya's, which only
        sdlora.formats names): magnitude, up times LyCORIS's scalar, down, the Tucker core; its alpha."""
        t = {"magnitude": layer.dora_scale} if layer.wd else {}
        t |= {"up": layer.lora_up.weight * layer.scalar, "down": layer.lora_down.weight}
        if layer.tucker:
            t["mid"] = layer.lora_mid.weight
        return self.name, {k: v.detach().float().clone() for k, v in t.items()}, float(layer.alpha)

    def load(self, layer, t, ratio):
        """The inverse of `collect`: up without LyCORIS's scalar."""
        from sdlora.lora.kinds.lora import _set

        _set(layer.lora_down.weight, t["down"])
        _set(layer.lora_up.weight, t["up"] * ratio / layer.scalar)
        if "magnitude" in t:
            _set(layer.dora_scale, t["magnitude"])
        if "mid" in t:
            _set(layer.lora_mid.weight, t["mid"])

    def trainable_count(self, layer):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)

    def up_parameters(self, layer):
        return list(layer.lora_up.parameters())

    def network_args(self, net):
        return {"dora_wd": "True", "wd_on_output": "False"}


SPEC = DoRA("dora", roles=("down", "up", "magnitude"), pair=True)
