"""kohya's three LoRA dropouts (networks/lora.py `LoRAModule.forward`), on the PEFT LoRA layers sdlora trains.

kohya computes lx = down(x) (its down projection), then, while training only:
- module dropout P: with probability P per forward, the module adds nothing (the whole LoRA path is skipped);
- network dropout P: `F.dropout(lx, P)`: each value of lx zeroed with probability P, the rest scaled by 1/(1-P);
- rank dropout P: a mask per (sample, rank) zeroes ranks with probability P, and the scale becomes
  scale/(1-P) ("treat as if the rank is changed");
and adds up(lx)·scale. PEFT's layer computes lora_B(lora_A(x))·scale; lora_B is linear without a bias, so
applying the same masks and factors to lora_A's output (a forward hook) gives kohya's result exactly. PEFT's own
`lora_dropout` drops the *input* x instead, which is not kohya's meaning, so it stays 0.

Hand-written (no library offers kohya's rank/module dropout on PEFT layers). The random numbers come from torch's
global CPU generator, which sdlora's checkpoints save (`rng/torch`), so a resumed run draws the same masks; they are
moved to the layer's device. They act only in a training forward: in train mode with gradients on. In eval mode
or under no_grad (the fixed-noise loss before and after training, sample grids, text caches, saving) they do
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.lora import kinds


@dataclass(frozen=True)
class Dropouts:
    network: float | None = None
    rank: float | None = None
    module: float | None = None

    @property
    def any(self) -> bool:
        return any(p for p in (self.network, self.rank, self.module))


def of(cfg) -> Dropouts:
    return Dropouts(cfg.network_dropout, cfg.rank_dropout, cfg.module_dropout)


def apply(lx: torch.Tensor, d: Dropouts, conv: bool) -> torch.Tensor:
    """kohya's dropouts on a down-projection output `lx` ([B, ..., r] for a Linear, [B, r, H, W] for a conv)."""
    if d.module and torch.rand(1).item() < d.module:
        return lx * 0.0  # lora_B(0) = 0: the module adds nothing (and its weights get no gradient)
    if d.network:
        keep = torch.rand(lx.shape) >= d.network
        lx = lx * keep.to(lx.device, lx.dtype) / (1.0 - d.network)
    if d.rank:
        r = lx.shape[1] if conv else lx.shape[-1]
        keep = (torch.rand(lx.shape[0], r) >= d.rank).to(lx.device, lx.dtype)
        shape = (lx.shape[0], r) + (1,) * (lx.dim() - 2) if conv else (lx.shape[0],) + (1,) * (lx.dim() - 2) + (r,)
        lx = lx * keep.reshape(shape) / (1.0 - d.rank)
    return lx


def attach(modules, d: Dropouts) -> int:
    """Hook `d` onto the down projection of every PEFT LoRA layer in `modules`; the number of layers hooked."""
    if not d.any:
        return 0
    n = 0
    for m in modules:
        for spec, layer in kinds.adapter_layers(m).values():
            if kinds.ADAPTER not in getattr(layer, "lora_A", {}):
                continue  # not a PEFT LoRA layer (TrainConfig refuses these dropouts for other kinds)
            down = layer.lora_A[kinds.ADAPTER]
            conv = isinstance(down, torch.nn.Conv2d)

            def hook(module, args, output, conv=conv):
                return apply(output, d, conv) if module.training and torch.is_grad_enabled() else output

            down.register_forward_hook(hook)
            n += 1
    return n
