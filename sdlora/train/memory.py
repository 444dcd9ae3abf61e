"""Memory of a run: frozen modules whose every output is cached leave memory (`release`; they come back for sample
grids and for the caller, `restore`; train/caches.py decides when), the frozen VAE of a multi-process run leaves the
training device once latents are cached, an estimate of what training holds is printed before the first step, and
the measured peak after the last (host RSS; CUDA when training there)."""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager

import torch


def _bytes(modules) -> int:
    seen, n = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
    return n


def move(module: torch.nn.Module, device: torch.device, dtype_of=lambda p: p.dtype, device_of=None) -> None:
    """Each parameter of `module` to `device` in `dtype_of(parameter)`, one at a time (buffers are left to
    `module.to`). Weights loaded from .safetensors are views of one memory-mapped file: each one's pages leave the
    process as soon as it is converted, so a conversion (fp32 -> bf16, CPU -> GPU) never holds the whole file
    resident next to the new copy (SD 1.5's UNet to bf16: 5.3 GB -> 2.1 GB peak RSS). `device_of(parameter)`, when
    given, overrides `device` per parameter (block swap keeps some in host memory)."""
    from sdlora import quant

    files = None
    for sub in module.modules():
        if quant.stored(sub):  # stored at --base/--te-precision: keeps its dtype; bitsandbytes moves its own scales
            first = next(sub.parameters(recurse=False), None)
            target = device_of(first) if device_of and first is not None else device
            if any(p.device != target for p in sub.parameters(recurse=False)):
                sub.to(target)
            continue
        for name, p in sub._parameters.items():
            if p is None or p.is_meta:
                continue
            old = p.data
            new = old.to(device_of(p) if device_of else device, dtype_of(p))
            if new is old:
                continue
            p.data = new
            if old.device.type == "cpu":
                files = _file_mappings() if files is None else files
                _drop_pages(old, files)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings (Linux /proc/self/maps; none elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def _drop_pages(t: torch.Tensor, files: list[tuple[int, int]]) -> None:
    """madvise(DONTNEED) the whole pages of `t` when they lie in a file mapping: they leave RSS and, should anything
    still read them, come back from the file unchanged (frozen weights are never written). Anonymous memory is
    never touched (DONTNEED would zero it)."""
    import ctypes
    import mmap

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(a <= start and end <= b for a, b in files):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def release(module: torch.nn.Module) -> None:
    """Free `module`'s weights: each parameter becomes a meta tensor (shape and dtype, no storage). The object, its
    config and its buffers stay, so every reference to it stays valid; `restore` gives the weights back."""
    done: dict[int, torch.nn.Parameter] = {}  # tied weights (T5's shared embedding) stay one parameter
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and not p.is_meta:
                if id(p) not in done:  # (a plain meta tensor: bitsandbytes' parameters cannot go to meta)
                    meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
                    done[id(p)] = torch.nn.Parameter(meta, requires_grad=False)
                sub._parameters[name] = done[id(p)]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim()


def trim() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim): a released T5-XXL's weights and the
    temporaries of its forward are freed, but glibc keeps heap pages it may reuse, and the RSS would not fall
    before the denoiser loads. Nothing happens without glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def released(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def restore(module: torch.nn.Module, source: torch.nn.Module, device: torch.device) -> None:
    """Give a `release`d module the weights of `source` (the same model, freshly loaded), each in the dtype it had,
    on `device`. A tensor already in that dtype and place is used as it is (no copy)."""
    from sdlora import quant

    # layers stored at a precision of their own (sdlora.quant) come back whole, as `source` loaded them: their
    # quantised weights carry state (bitsandbytes' scales) that a tensor copy would lose
    for name, sub in list(module.named_modules(remove_duplicate=False)):
        if name and quant.stored(sub) and any(p.is_meta for p in sub.parameters()):
            parent, _, attr = name.rpartition(".")
            new = source.get_submodule(name)
            move(new, device)
            setattr(module.get_submodule(parent) if parent else module, attr, new)
    fresh = dict(source.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    done: dict[int, torch.nn.Parameter] = {}
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        for name, p in sub._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in done:
                    w = fresh[f"{sub_name}.{name}" if sub_name else name].detach().to(device, p.dtype)
                    done[id(p)] = torch.nn.Parameter(w, requires_grad=False)
                sub._parameters[name] = done[id(p)]


def offload(module: torch.nn.Module, device: torch.device) -> bool:
    """Move `module` to the CPU when training runs on an accelerator; True if it moved."""
    if device.type == "cpu":
        return False
    module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device, offloaded: bool):
    """`module` on `device` inside (for a sample grid), back on the CPU after when it had been offloaded."""
    if offloaded:
        module.to(device)
    try:
        yield
    finally:
        if offloaded:
            offload(module, device)


def estimate(device_modules, trainable: list[torch.Tensor], optimizer_state_bytes_per_value: int) -> str:
    """Weights on the training device + LoRA weights, gradients and optimizer state (activations come on top)."""
    frozen = _bytes(device_modules)
    n = sum(p.numel() for p in trainable)
    lora = n * (4 + 4 + optimizer_state_bytes_per_value)
    return (f"memory: {frozen / 2**20:.0f} MiB of model weights on the training device + {lora / 2**20:.1f} MiB for "
            f"{n / 1e6:.2f} M LoRA values (weights, gradients, optimizer state); activations come on top")


def peak(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    text = f"peak memory: host {rss_mib:.0f} MiB (RSS)"
    if device.type == "cuda":
        text += f", CUDA {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated"
    return text


# optimizer state bytes per trainable value, for the estimate (8-bit: 2 bytes + block scales, rounded up)
STATE_BYTES = {"adamw": 8, "adamw8bit": 3, "prodigy": 16, "adafactor": 4, "schedulefree": 8}
