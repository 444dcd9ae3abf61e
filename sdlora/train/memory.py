"""Memory of a run: the frozen VAE leaves the training device once latents are cached (it returns for sample
grids), an estimate of what training holds is printed before the first step, and the measured peak after the last
(host RSS; CUDA when training there)."""

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
