"""Activation memory of a training step, counted on the meta device: the real-size denoiser (built from its config,
no weights) runs one forward on meta tensors of the real shapes, and every tensor autograd saves for the backward
is counted once (by its storage) through `torch.autograd.graph.saved_tensors_hooks`, attributed to the gradient-
checkpointing unit that saved it (each block diffusers would checkpoint; found by giving the model a recording
`_gradient_checkpointing_func`). The bytes are exact for what autograd keeps at those shapes and dtypes; what the
count does not see (autocast's fp32 copies, the allocator's rounding, kernel workspaces) is left to the GPU check.

Attention is counted as the fused kernels a GPU uses keep it (FlashAttention / memory-efficient SDPA: q, k, v,
the output and a float32 log-sum-exp per query), not as the CPU's math path would (the full attention matrix).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Activations:
    outside: int = 0  # bytes saved outside the checkpointing units (embedders, final layer, loss)
    units: list[list] = field(default_factory=list)  # per unit call: [class name, saved bytes, new input bytes]

    @property
    def saved(self) -> int:
        return self.outside + sum(u[1] for u in self.units)

    @property
    def largest_unit(self) -> int:
        return max((u[1] for u in self.units), default=0)

    @property
    def largest_input(self) -> int:
        return max((u[2] for u in self.units), default=0)

    def peak(self, checkpointing: bool) -> int:
        """Activation bytes held at the peak of a step. Without checkpointing: everything saved, plus the gradient
        of the largest block input twice over (the backward's working set, estimated). With it: the inputs every
        unit keeps, what is saved outside the units, one unit's saved tensors (its recomputation) and the same
        working set."""
        work = 2 * self.largest_input
        if not checkpointing:
            return self.saved + work
        return sum(u[2] for u in self.units) + self.outside + self.largest_unit + work


class _FlashLike(torch.autograd.Function):
    """What a fused attention kernel saves: q, k, v, the output, a float32 log-sum-exp per query and head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa(*args, **kwargs):
    """Stands in for `F.scaled_dot_product_attention(query, key, value, ...)` (positional or by keyword)."""
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    return _FlashLike.apply(q, k, v)


@contextmanager
def _fused_attention():
    f = torch.nn.functional
    original = f.scaled_dot_product_attention
    f.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        f.scaled_dot_product_attention = original


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out += _tensors(v)
        elif isinstance(v, dict):
            out += _tensors(v.values())
    return out


def count(denoiser: torch.nn.Module, run, trace: list | None = None) -> Activations:
    """Run `run()` (one forward of `denoiser` with grad enabled) and count what autograd saves, per
    checkpointing unit. `denoiser` must support gradient checkpointing (every diffusers denoiser does); its
    parameters' storages are not activations and are not counted. `trace`: a list to append (unit, shape, dtype,
    bytes) of each counted tensor to."""
    params = {_key(p) for p in denoiser.parameters()}
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # every counted tensor held to the end: a freed storage's address is not reused
    acts = Activations()
    current: list[int | None] = [None]

    def pack(t):
        try:
            k = _key(t)
        except (RuntimeError, NotImplementedError):
            return t
        if k not in params and k not in seen:
            seen.add(k)
            alive.append(t)
            n = t.untyped_storage().nbytes()
            if trace is not None:
                trace.append((current[0], tuple(t.shape), t.dtype, n))
            if current[0] is None:
                acts.outside += n
            else:
                acts.units[current[0]][1] += n
        return t

    inputs: set[int] = set()

    def unit(fn, *args, **kwargs):
        new = 0
        for t in _tensors(list(args) + list(kwargs.values())):
            if _key(t) not in inputs and _key(t) not in params:
                inputs.add(_key(t))
                alive.append(t)
                new += t.untyped_storage().nbytes()
        acts.units.append([type(fn).__name__, 0, new])
        prev, current[0] = current[0], len(acts.units) - 1
        try:
            return fn(*args, **kwargs)
        finally:
            current[0] = prev

    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=unit)
    try:
        with _fused_attention(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        denoiser.disable_gradient_checkpointing()
    return acts
