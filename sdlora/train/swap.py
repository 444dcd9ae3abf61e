"""Block swap (`--blocks-to-swap N`): N transformer blocks of the denoiser keep their frozen weights in host memory
and each is copied to the training device for its forward and again for its backward, the next block prefetched on
a side CUDA stream meanwhile. The LoRA weights of those blocks never move: they stay on the device, the same
Parameter objects the optimizer holds (so its state and the gradients stay where they are).

Why not diffusers' group offloading (`diffusers.hooks.apply_group_offloading`, `enable_group_offload`, 0.42.1)? It
is written for inference, and for training it lacks four things (read in diffusers/hooks/group_offloading.py):
- it moves every tensor of a group, the LoRA weights too: with `use_stream` each offload sets `param.data` back to
  the host copy taken when offloading was applied (`_offload_to_memory`), which would undo every optimizer step;
  without streams the LoRA weights sit on the host when the optimizer steps;
- it offloads every block of the model; it cannot keep N of them in host memory and the rest on the device;
- it onloads in forward hooks only, and prefetches in the forward execution order: a backward (which runs the
  blocks in reverse, recomputing them under gradient checkpointing) gets no useful prefetch;
- it offloads by swapping `param.data`, but autograd saves views of the weights (`weight.t()` for the input
  gradient of a Linear, checked: the view keeps the onloaded storage alive), so without gradient checkpointing
  every block's onloaded weights stay on the device until its backward: nothing is saved.
So this module does what it lacks: a block's frozen weights are copied into separate device tensors that are put
in the block's `_parameters` for the length of its forward and taken out after (the host tensors put back). With
gradient checkpointing nothing of a block is saved for backward; its recomputation in the backward is a forward
again (copies again, freed once that block's backward is done). Without it, a `saved_tensors_hooks` pack hook
replaces each saved view of a copied weight by a reference, and the unpack hook copies the block to the device
again when the backward needs it.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sdlora.errors import SdloraError

CAPACITY = 2  # blocks whose device copies are kept at once: the one running and the one prefetched


def split(spec, lengths: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Blocks of each of the family's swappable lists (`spec.swap_blocks`, lengths `lengths`) that N swaps."""
    return spec.swap_split(n) if spec.swap_split else (n,) + (0,) * (len(lengths) - 1)


def maximum(spec, lengths: tuple[int, ...]) -> int:
    """The largest N whose split fits the lists (FLUX.1: 38, every block; kohya stops at 35 because its swapper
    exchanges weights with blocks that stay resident; here a swapped block needs no resident partner)."""
    n = 0
    while all(c <= k for c, k in zip(split(spec, lengths, n + 1), lengths)):
        n += 1
    return n


def lengths_of(spec, denoiser) -> tuple[int, ...]:
    return tuple(len(getattr(denoiser, a)) for a in spec.swap_blocks)


def check(spec, lengths: tuple[int, ...], n: int) -> None:
    """Refuse, in one line, an N the family cannot swap."""
    if n == 0:
        return
    if not spec.swap_blocks:
        raise SdloraError(f"--blocks-to-swap is for the transformer families (SD 3.x, FLUX.1), not {spec.label}: its "
                          "U-Net fits 8 GB with gradient checkpointing and cached text embeddings (`sdlora plan` "
                          "shows the bytes), and its few, unequal U-Net blocks would not pay for the copies")
    top = maximum(spec, lengths)
    if n > top:
        parts = " + ".join(f"{k} {a}" for k, a in zip(lengths, spec.swap_blocks))
        raise SdloraError(f"--blocks-to-swap {n} is more than this {spec.label} model has ({parts}): the maximum "
                          f"is {top}")


def chosen(spec, denoiser, n: int) -> list[torch.nn.Module]:
    """The blocks N swaps, in execution order: the last ones of each list (as kohya)."""
    out = []
    for attr, k in zip(spec.swap_blocks, split(spec, lengths_of(spec, denoiser), n)):
        blocks = list(getattr(denoiser, attr))
        out += blocks[len(blocks) - k:] if k else []
    return out


def describe(spec, denoiser, n: int) -> str:
    counts = split(spec, lengths_of(spec, denoiser), n)
    parts = ", ".join(f"{k} of {len(getattr(denoiser, a))} {a}" for k, a in zip(counts, spec.swap_blocks))
    return f"block swap: {parts} in host memory"


def _frozen(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    return [(sub, name, p) for sub in block.modules() for name, p in sub._parameters.items()
            if p is not None and not p.requires_grad]


def place(denoiser: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device, dtype_of) -> None:
    """The denoiser on `device` in `dtype_of(param)`, one tensor at a time, except the frozen weights of `blocks`,
    which are cast where they are (host memory; pinned when the device is a GPU, for asynchronous copies)."""
    from sdlora.train import memory

    host = {id(p) for b in blocks for _, _, p in _frozen(b)}
    memory.move(denoiser, device, dtype_of, device_of=lambda p: p.device if id(p) in host else device)
    for sub in denoiser.modules():  # buffers (small); `denoiser.to` would move the swapped weights too
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = b.to(device)
    if device.type == "cuda":
        for b in blocks:
            for _, _, p in _frozen(b):
                if type(p) is torch.nn.Parameter and not p.is_pinned():
                    p.data = p.data.pin_memory()


@dataclass
class _Saved:
    """What the pack hook keeps of a saved view of a copied weight: which block and weight, and the view."""

    block: int
    k: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class BlockSwap:
    """Swaps `blocks` (modules of `owner`, the denoiser, in execution order) between host memory and `device`.

    `stats[i]` counts, for block i: "forward" and "backward" (times its weights were needed in each), "copies"
    (copies to the device), "prefetched" (copies started ahead, on the side stream on CUDA)."""

    def __init__(self, owner: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device):
        self.owner, self.blocks, self.device = owner, blocks, torch.device(device)
        self.host = [_frozen(b) for b in blocks]
        self.cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.events: dict[int, torch.cuda.Event] = {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = [Counter() for _ in blocks]
        self.in_forward = False
        self.originals = [b.forward for b in blocks]
        for i, b in enumerate(blocks):
            b.forward = functools.partial(self._run, i, b.forward)
        self.handles = [owner.register_forward_pre_hook(lambda *_: self._phase(True)),
                        owner.register_forward_hook(lambda *_: self._phase(False), always_call=True)]

    def _phase(self, forward: bool) -> None:
        self.in_forward = forward  # block calls outside the denoiser's own forward are recomputations in backward

    def close(self) -> None:
        """Remove the hooks; the swapped weights stay in host memory (the model is not used again by the run)."""
        for b, f in zip(self.blocks, self.originals):
            b.forward = f
        for h in self.handles:
            h.remove()
        self.cache.clear()

    # ---- copies
    def _copy(self, i: int, ahead: bool) -> None:
        stream = self.stream if ahead else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            copies = [_to_device(p, self.device, non_blocking=stream is not None) for _, _, p in self.host[i]]
        if stream is not None:
            self.events[i] = torch.cuda.Event()
            self.events[i].record(stream)
        self.cache[i] = copies
        self.stats[i]["prefetched" if ahead else "copies"] += 1

    def fetch(self, i: int, phase: str) -> list[torch.Tensor]:
        """Block i's weights on the device (copied now unless prefetched), and the next block's copy started."""
        self.stats[i][phase] += 1
        if i not in self.cache:
            self._copy(i, ahead=False)
        event = self.events.pop(i, None)
        if event is not None:  # copied on the side stream: wait for it, and tell the allocator who uses it now
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in self.cache[i]:
                t.record_stream(current)
        self.cache.move_to_end(i)
        nxt = i + 1 if phase == "forward" else i - 1
        if 0 <= nxt < len(self.blocks) and nxt not in self.cache:
            self._copy(nxt, ahead=True)
        for old in [k for k in self.cache if k not in (i, nxt)][:max(0, len(self.cache) - CAPACITY)]:
            del self.cache[old]
            self.events.pop(old, None)
        return self.cache[i]

    # ---- the block's forward (and its recomputation in backward under gradient checkpointing)
    def _run(self, i: int, forward, *args, **kwargs):
        copies = self.fetch(i, "forward" if self.in_forward else "backward")
        for (sub, name, _), t in zip(self.host[i], copies):
            sub._parameters[name] = (t if isinstance(t, torch.nn.Parameter)
                                     else torch.nn.Parameter(t, requires_grad=False))
        try:
            if torch.is_grad_enabled() and not getattr(self.owner, "gradient_checkpointing", False):
                ptrs = {t.untyped_storage().data_ptr(): k for k, t in enumerate(copies) if t.numel()}
                with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, i, ptrs), self._unpack):
                    return forward(*args, **kwargs)
            return forward(*args, **kwargs)
        finally:
            for sub, name, p in self.host[i]:
                sub._parameters[name] = p

    def _pack(self, i: int, ptrs: dict[int, int], t: torch.Tensor):
        try:
            k = ptrs.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage
            k = None
        if k is None:
            return t
        return _Saved(i, k, t.size(), t.stride(), t.storage_offset())

    def _unpack(self, x):
        if not isinstance(x, _Saved):
            return x
        base = self.fetch(x.block, "backward")[x.k]
        return base.as_strided(x.size, x.stride, x.offset)


def _to_device(p: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """A device copy of a frozen weight. On the host itself (CPU training, the tests) a real copy is made too, so
    that the mechanism runs as it does on a GPU. Quantised weights (bitsandbytes' Params4bit/Int8Params, torchao
    tensors) move with their own `.to`, which carries their quantisation state."""
    if type(p) is not torch.nn.Parameter:
        return p.to(device, non_blocking=non_blocking)
    return p.detach().to(device, non_blocking=non_blocking, copy=True)


def enable(spec, denoiser: torch.nn.Module, n: int, device: torch.device, dtype_of) -> BlockSwap | None:
    """Place the denoiser for block swap (see `place`) and install the swapping; None when N is 0."""
    if not n:
        return None
    check(spec, lengths_of(spec, denoiser), n)
    blocks = chosen(spec, denoiser, n)
    place(denoiser, blocks, device, dtype_of)
    return BlockSwap(denoiser, blocks, device)
