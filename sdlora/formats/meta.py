"""`ss_*` (kohya) and `modelspec.*` (SAI) metadata, and kohya's `sshs_*` hashes."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone

import torch
from safetensors.torch import save

import sdlora

ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}  # modelspec.architecture (SAI model spec 1.0)
# kohya `ss_base_model_version` (library/train_util.py) -> modelspec.architecture (library/sai_model_spec.py)
VERSION_ARCHITECTURE = {"sd_v1": "stable-diffusion-v1/lora", "sd_v2_512": "stable-diffusion-v2-512/lora",
                        "sd_v2_768_v": "stable-diffusion-v2-768-v/lora",
                        "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora"}


def base_model_version(arch: str, prediction_type: str = "epsilon") -> str:
    """kohya's `ss_base_model_version` of a base model: sd_v1, sd_v2_512 / sd_v2_768_v (v-prediction), sdxl_base_v1-0."""
    if arch == "sd2":
        return "sd_v2_768_v" if prediction_type == "v_prediction" else "sd_v2_512"
    return {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}.get(arch, "sd_v1")


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash` (library/train_util.py precalculate_safetensors_hashes):
    sha256 of the tensor bytes of the file as saved with its `ss_*` metadata, and the 8-hex "addnet" legacy hash
    of the 64 KiB at offset 1 MiB (empty, so sha256 of nothing, for files under 1 MiB)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    buf = io.BytesIO(data)
    buf.seek(0x100000)
    legacy = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def build(*, arch: str, base_model_version: str, model_name: str, output_name: str, rank: int, alpha: float,
          preset: str, targets: dict[str, str], resolution: int, steps: int, num_images: int, num_reg_images: int,
          trigger: str, tag_frequency: dict[str, dict[str, int]], lr: float, te_lr: float | None, seed: int,
          batch_size: int, grad_accum: int, mixed_precision: str, lr_scheduler: str, warmup_steps: int,
          prior_loss_weight: float | None, started: datetime, clip_skip: int | None = None) -> dict[str, str]:
    """The metadata sdlora writes: the `ss_*` keys A1111, kohya's tools and civitai read, plus modelspec."""
    now = datetime.now(timezone.utc)
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({"preset": preset, "targets": targets}),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(arch == "sd2"),
        "ss_sd_model_name": model_name,
        "ss_output_name": output_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(te_lr) if te_lr is not None else "None",
        "ss_seed": str(seed),
        "ss_batch_size_per_device": str(batch_size),
        "ss_gradient_accumulation_steps": str(grad_accum),
        "ss_mixed_precision": mixed_precision,
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": str(warmup_steps),
        "ss_prior_loss_weight": str(prior_loss_weight) if prior_loss_weight is not None else "None",
        "ss_clip_skip": str(clip_skip) if clip_skip else "None",
        "ss_training_started_at": str(started.timestamp()),
        "ss_training_finished_at": str(now.timestamp()),
        "ss_training_comment": f"trigger: {trigger}" if trigger else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": VERSION_ARCHITECTURE.get(base_model_version, ARCHITECTURE.get(arch, arch)),
        # kohya's sai_model_spec: SDXL is Stability's generative-models implementation, SD 1/2 diffusers'
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl" else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "sdlora_version": sdlora.__version__,
    }
    return md
