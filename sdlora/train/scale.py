"""Several processes beyond DDP: FSDP (accelerate's FSDP2) shards the frozen base across GPUs while the LoRA
weights stay whole on every process, so the adapter, checkpoints and resumes work as under DDP.

`configs/accelerate-fsdp.yaml` is the accelerate config; `configs/README.md` (scale) says when it pays and how to
launch on several machines. accelerate runs FSDP on GPUs only: on CPU its state falls back to plain multi-process
data parallelism without saying so, which `check_fsdp` turns into an error.
"""

from __future__ import annotations

import os

import torch

from sdlora.errors import SdloraError


def fsdp_requested() -> bool:
    """Did `accelerate launch` (an FSDP config or --use_fsdp) ask for FSDP?"""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(accelerator, cfg) -> bool:
    """True when this run is sharded with FSDP; refuses what FSDP cannot run here, in one line."""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp_requested() and not fsdp:
        raise SdloraError(f"the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only (here: "
                          f"{accelerator.distributed_type.value} on {accelerator.device.type}); on CPU launch without "
                          "FSDP (several processes with --multi_gpu and ACCELERATE_USE_CPU=1), or run on CUDA GPUs")
    if not fsdp:
        return False
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SdloraError("FSDP version 1 cannot shard fp32 LoRA weights beside a bf16/fp16 base (one dtype per flat "
                          "parameter); set fsdp_version: 2 in the accelerate config (configs/accelerate-fsdp.yaml)")
    if not cfg.no_text_encoder:
        raise SdloraError("with FSDP sdlora shards the UNet only: add --no-text-encoder (the frozen text encoders stay "
                          "whole on each GPU, and their prompts are cached)")
    if cfg.sample_every:
        raise SdloraError("--sample-every runs the UNet on the main process alone, which a sharded (FSDP) UNet "
                          "cannot: drop it and generate from the checkpoints' adapters (--save-every) instead")
    return True


def keep_whole(accelerator, denoiser: torch.nn.Module) -> None:
    """Keep the LoRA weights out of FSDP's sharding (accelerate's `ignored_modules`, FSDP2's `ignored_params`):
    they are a few MB, and whole they save, checkpoint and resume exactly as in one process. Their gradients are
    averaged by `average_gradients`. Call before `accelerator.prepare`."""
    owners = [m for m in denoiser.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    accelerator.state.fsdp_plugin.ignored_modules = owners


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` (whole on every process, so not reduced by FSDP) across processes, in one
    flat all-reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
