"""lora: kohya's LoRA, a down/up pair per module (and the pair maths LoCon and DoRA share).

ΔW = up @ down, scale alpha/r (r = down's rows): Linear [out, in], 1x1 conv [out, in, 1, 1], a kxk LoCon conv
(down [r, in, k, k], up [out, r, 1, 1]), or a Tucker LoCon conv (down [r, in, 1, 1], mid [r, r, kh, kw],
up [out, r, 1, 1]). Trained with PEFT's `LoraConfig`: a kxk conv gets lora_A = Conv2d(in, r, k) and
lora_B = Conv2d(r, out, 1), exactly LyCORIS/kohya's LoCon pair with scale alpha/r. Written by kohya's own network
module (`networks.lora`, the family's), LyCORIS's `algo=locon` when DoRA is on.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from sdlora.lora.kinds.base import ADAPTER, KindSpec, lora_scale

if TYPE_CHECKING:
    import torch


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/r)·up@down in fp32, shaped like the base weight: Linear [out, in], 1x1 conv [out, in, 1, 1], or a kxk
    LoCon conv (down [r, in, k, k], up [out, r, 1, 1]): kohya's `merge_to`,
    conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), i.e. up applied over down's output channels."""
    import torch

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


def locon_tucker_delta(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/r)·ΔW of a Tucker LoCon: ΔW[o, i, y, x] = Σ_{a,b} up[o, a] · mid[a, b, y, x] · down[b, i]."""
    import torch

    r = down.shape[0]
    d = torch.einsum("oa,abyx,bi->oiyx", up.reshape(up.shape[0], -1).float(), mid.float(),
                     down.reshape(r, -1).float())
    return d * lora_scale(alpha, r)


def pair_kind(roles: dict[str, torch.Tensor]) -> str:
    """A down/up module's kind: "dora" with a magnitude, "locon" for a conv with a kernel or a Tucker core."""
    if "magnitude" in roles:
        return "dora"
    down = roles["down"]
    return "locon" if "mid" in roles or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)) else "lora"


class PairKind(KindSpec):
    """The file side of every down/up kind (lora, locon, dora). Their soundness checks name kohya's keys, so they
    are `sdlora.formats.adapter.check_module`'s."""

    def rank(self, t):
        return int(t["down"].shape[0])

    def shape(self, t):
        if "mid" in t:
            return (t["up"].shape[0], t["down"].shape[1], *t["mid"].shape[2:])
        return lora_delta_shape(t["down"], t["up"])

    def delta(self, t, alpha):
        if "mid" in t:
            return locon_tucker_delta(t["down"], t["mid"], t["up"], alpha)
        return lora_delta(t["down"], t["up"], alpha)


def _set(param, value) -> None:
    """Copy `value` into a trained parameter (reshaped to it: the counts agree), in its dtype."""
    param.data.copy_(value.reshape(param.shape).to(param.dtype))


@functools.cache
def _layer_type():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


class PeftLoRA(PairKind):
    """lora and locon as trained: PEFT's LoRA layers."""

    def inject(self, model, where, net):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=where.rank, lora_alpha=where.alpha, init_lora_weights=True, lora_dropout=0.0,
                            **where.peft_patterns())
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)

    def layer_of(self, module):
        return module if isinstance(module, _layer_type()) and ADAPTER in module.lora_A else None

    def collect(self, layer):
        down = layer.lora_A[ADAPTER].weight.detach().float().clone()
        up = layer.lora_B[ADAPTER].weight.detach().float().clone()
        roles = {"down": down, "up": up}
        return pair_kind(roles), roles, float(layer.lora_alpha[ADAPTER])

    def load(self, layer, t, ratio):
        _set(layer.lora_A[ADAPTER].weight, t["down"])
        _set(layer.lora_B[ADAPTER].weight, t["up"] * ratio)

    def up_parameters(self, layer):
        return list(layer.lora_B[ADAPTER].parameters())

    def trainable_count(self, layer):
        """r·(d_in·k·k + d_out), from the base layer's widths."""
        import torch

        base = layer.get_base_layer()
        d_in, d_out = (base.in_features, base.out_features) if isinstance(base, torch.nn.Linear) else (
            base.in_channels, base.out_channels)
        k = 1 if isinstance(base, torch.nn.Linear) else base.kernel_size[0] * base.kernel_size[1]
        return layer.r[ADAPTER] * (d_in * k + d_out)


SPEC = PeftLoRA("lora", help="kohya", roles=("down", "up"), pair=True, plain_pair=True, trainable=True,
                takes_dora=True, kohya_module=True, algo="locon")
