"""Activation memory of a training step, counted on the meta device: the real-size denoiser (built from its config,
no weights) runs one forward on meta tensors of the real shapes, and every tensor autograd saves for the backward
is counted once (by its storage) through `torch.autograd.graph.saved_tensors_hooks`, attributed to the gradient-
checkpointing unit that saved it (each block diffusers would checkpoint; found by giving the model a recording
`_gradient_checkpointing_func`). The bytes are exact for what autograd keeps at those shapes and dtypes; what the
count does not see (autocast's fp32 copies, the allocator's rounding, kernel workspaces) is left to the GPU check.

Attention is counted as the fused kernels a GPU uses keep it (FlashAttention / memory-efficient SDPA: q, k, v,
the output and a float32 log-sum-exp per query), not as the CPU's math path would (the full attention matrix).

A unit identical to one already run (same module structure, parameter shapes and dtypes, LoRA layers, attention
processors, and inputs of the same shapes) is not run again: what the first one saved is replayed onto the new call
(tensors it made itself count again, tensors among its inputs count when their storage was not saved before) and
its outputs are meta tensors of the recorded shapes. FLUX.1's 57 blocks run 2 forwards instead of 57 (on meta
tensors every op goes through Python, so this is most of the planner's time); `repeat=False` runs every unit.
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


def _signature(fn, flat: list, rest) -> tuple | None:
    """What decides the tensors a unit saves: its modules (repr: classes, widths, LoRA ranks and dropout), its
    parameters' shapes, dtypes and trainability, its attention processors, its inputs' shapes, dtypes, trainability
    and aliasing, and its other arguments. None (never replayed) for an argument of a kind not known here."""
    if not isinstance(fn, torch.nn.Module):
        return None
    keys = [_key(t) for t in flat]
    tensors = tuple((tuple(t.shape), t.dtype, t.requires_grad, keys.index(k)) for t, k in zip(flat, keys))
    other = _plain(rest)
    if other is None:
        return None
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in fn.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in fn.named_buffers())
    processors = tuple(type(m.processor).__name__ for m in fn.modules() if hasattr(m, "processor"))
    return (repr(fn), params, buffers, processors, tensors, other)


def _plain(value):
    """`value` (the non-tensor arguments, tensors replaced by None) as a hashable tuple, or None if it holds an object
    whose effect on the forward a signature cannot see."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return ("v", value)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return None if None in items else ("s", tuple(items))
    if isinstance(value, dict):
        items = [(k, _plain(v)) for k, v in value.items()]
        return None if any(v is None for _, v in items) else ("d", tuple(items))
    return None


def _strip(value):
    """`value` with every tensor replaced by None (what `_plain` describes besides the tensors)."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, (tuple, list)):
        return [_strip(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()}
    return value


def _outputs_spec(out, arg_keys: list[int]):
    """How to rebuild `out` on a later call: each tensor as the index of the input it is (an alias), or its storage
    (key, bytes, trainability) and its view of it (a block may return two views of one tensor); None if `out` holds
    anything but tensors, tuples, lists and None."""
    if out is None:
        return ("none",)
    if isinstance(out, torch.Tensor):
        k = _key(out)
        if k in arg_keys:
            return ("arg", arg_keys.index(k))
        return ("new", k, out.untyped_storage().nbytes(), out.requires_grad, out.dtype, tuple(out.shape),
                out.stride(), out.storage_offset())
    if isinstance(out, (tuple, list)):
        items = [_outputs_spec(o, arg_keys) for o in out]
        return None if None in items else (type(out), items)
    return None


def _rebuild(spec, args: list, made: dict):
    """The outputs `spec` describes, for a call with inputs `args`; `made`: recorded storage -> a new meta tensor
    standing for it (one per storage, so views of one storage stay views of one)."""
    if spec[0] == "none":
        return None
    if spec[0] == "arg":
        return args[spec[1]]
    if spec[0] == "new":
        _, k, nbytes, grad, dtype, shape, stride, offset = spec
        if k not in made:
            made[k] = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device="meta", requires_grad=grad)
        return made[k].as_strided(shape, stride, offset)
    return spec[0](_rebuild(s, args, made) for s in spec[1])


def count(denoiser: torch.nn.Module, run, trace: list | None = None, repeat: bool = True) -> Activations:
    """Run `run()` (one forward of `denoiser` with grad enabled) and count what autograd saves, per
    checkpointing unit. `denoiser` must support gradient checkpointing (every diffusers denoiser does); its
    parameters' storages are not activations and are not counted. `trace`: a list to append (unit, shape, dtype,
    bytes) of each counted tensor to. `repeat`: replay a unit identical to one already run instead of running it
    (only on meta tensors; see the module docstring)."""
    params = {_key(p) for p in denoiser.parameters()}
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # every counted tensor held to the end: a freed storage's address is not reused
    acts = Activations()
    current: list[int | None] = [None]
    recording: list[list | None] = [None]  # the unit being recorded: (storage, shape, dtype, bytes) of each save
    recorded: dict = {}  # signature -> (saves, output spec, input storages)
    inputs_now: list[set] = [set()]  # the storages of the recorded unit's inputs

    def add(k, t_shape, dtype, n):
        seen.add(k)
        if trace is not None:
            trace.append((current[0], t_shape, dtype, n))
        if current[0] is None:
            acts.outside += n
        else:
            acts.units[current[0]][1] += n

    def pack(t):
        try:
            k = _key(t)
        except (RuntimeError, NotImplementedError):
            return t
        if k in params:
            return t
        saves = recording[0]
        if saves is not None and all(k != e[0] for e in saves):
            where = "arg" if k in inputs_now[0] else "before" if k in seen else "made"
            saves.append((k, where, tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        if k not in seen:
            alive.append(t)
            add(k, tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    inputs: set[int] = set()

    def replay(entry, flat: list):
        saves, out_spec, arg_keys = entry
        made: dict = {}
        result = _rebuild(out_spec, flat, made)
        for k, where, t_shape, dtype, n in saves:
            if where == "arg":  # one of the unit's inputs: counted once over the whole forward
                t = flat[arg_keys.index(k)]
                if _key(t) not in seen:
                    add(_key(t), t_shape, dtype, n)
            elif where == "made":  # made inside the unit: a new storage on every call (the outputs among them)
                if k not in made:
                    made[k] = torch.empty(n, dtype=torch.uint8, device="meta")
                add(_key(made[k]), t_shape, dtype, n)
            # "before": a tensor from outside the unit other than its inputs, counted when first saved
        alive.extend(made.values())
        return result

    def unit(fn, *args, **kwargs):
        new = 0
        flat = _tensors(list(args) + list(kwargs.values()))
        for t in flat:
            if _key(t) not in inputs and _key(t) not in params:
                inputs.add(_key(t))
                alive.append(t)
                new += t.untyped_storage().nbytes()
        acts.units.append([type(fn).__name__, 0, new])
        prev, current[0] = current[0], len(acts.units) - 1
        sig = (_signature(fn, flat, _strip([args, kwargs])) if repeat and prev is None
               and all(t.is_meta for t in flat) else None)
        try:
            if sig is not None and sig in recorded:
                return replay(recorded[sig], flat)
            recording[0], inputs_now[0] = ([], {_key(t) for t in flat}) if sig is not None else (None, set())
            out = fn(*args, **kwargs)
            if sig is not None:
                spec = _outputs_spec(out, [_key(t) for t in flat])
                if spec is not None:
                    recorded[sig] = (recording[0], spec, [_key(t) for t in flat])
            return out
        finally:
            current[0], recording[0] = prev, None

    denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=unit)
    try:
        with _fused_attention(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        denoiser.disable_gradient_checkpointing()
    return acts
