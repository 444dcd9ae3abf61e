"""Load a base model: the built-in `tiny`, a hub id, a local diffusers folder or a single-file checkpoint.

The architecture and prediction type are detected from what is loaded, never asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("tiny",)

# Native training resolution per architecture (what the base model was trained at).
NATIVE_RESOLUTION = {"sd1": 512, "tiny": 64}

# kohya's `ss_base_model_version` strings (library/train_util.py).
BASE_MODEL_VERSION = {"sd1": "sd_v1"}


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that training and generation use."""

    name: str  # what the user passed as --model
    arch: str  # "sd1" (SD 1.x family; the tiny model is SD1-shaped)
    prediction_type: str  # "epsilon" or "v_prediction"
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    scheduler_config: dict = field(default_factory=dict)  # the model's own inference scheduler config
    native_resolution: int = 512

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """The components that LoRA adapts, by kohya component name."""
        return {"unet": self.unet, "te": self.text_encoder}

    def pipeline(self, scheduler=None):
        """A diffusers StableDiffusionPipeline over these very modules (no copy)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors file, read from its header alone."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise SdloraError(f"{path}: not a readable .safetensors file ({e}); re-download or re-export it") from e
    return [k for k in header if k != "__metadata__"]


def detect_checkpoint_arch(keys: list[str]) -> str:
    """Architecture of an original-layout (LDM/SGM) single-file checkpoint from its tensor names."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SdloraError("checkpoint has no text-encoder weights sdlora recognises; pass an SD 1.x checkpoint")


def detect_arch(unet_config, text_encoder_config) -> str:
    """Architecture of loaded diffusers components."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if text_encoder_config.hidden_act == "gelu" or unet_config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def _unsupported(arch: str, name: str) -> SdloraError:
    return SdloraError(f"{name} is an {arch.upper()} model; this version of sdlora trains SD 1.x: pass an SD 1.x model")


def load_base(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load `name`: "tiny", a hub id, a local diffusers folder, or a single-file .safetensors checkpoint."""
    if name == "tiny":
        from sdlora.tiny import TINY_RESOLUTION, tiny_components

        c = tiny_components()
        if dtype != torch.float32:
            for m in (c["unet"], c["text_encoder"], c["vae"]):
                m.to(dtype)
        return BaseModel(name="tiny", arch="sd1", prediction_type="epsilon", native_resolution=TINY_RESOLUTION,
                         unet=c["unet"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], vae=c["vae"],
                         noise_scheduler=c["noise_scheduler"], scheduler_config=c["scheduler_config"])

    path = Path(name).expanduser()
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise SdloraError(f"{name}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise SdloraError(f"{name}: no such file; pass an existing .safetensors checkpoint, a diffusers folder or a hub id")
        arch = detect_checkpoint_arch(_safetensors_keys(path))
        if arch != "sd1":
            raise _unsupported(arch, name)
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), dtype=dtype)
        except Exception as e:  # diffusers raises many types; the user needs one line
            raise SdloraError(f"{name}: could not load the checkpoint ({_first_line(e)}); "
                              "check the file is complete, or pass a diffusers folder") from e
    else:
        if path.exists() and not (path / "model_index.json").is_file():
            raise SdloraError(f"{name}: folder has no model_index.json; pass a diffusers model folder, "
                              "a .safetensors checkpoint, a hub id or 'tiny'")
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else name, dtype=dtype,
                                                     safety_checker=None, requires_safety_checker=False)
        except Exception as e:
            raise SdloraError(f"could not load model '{name}' ({_first_line(e)}); pass a local diffusers folder, "
                              "a .safetensors checkpoint, or --model tiny to try sdlora offline") from e
    return from_pipeline(pipe, name)


def from_pipeline(pipe, name: str) -> BaseModel:
    """Wrap a loaded diffusers pipeline, detecting the architecture and prediction type."""
    from diffusers import DDPMScheduler

    arch = detect_arch(pipe.unet.config, pipe.text_encoder.config)
    if arch != "sd1":
        raise _unsupported(arch, name)
    sched_cfg = dict(pipe.scheduler.config)
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    return BaseModel(name=name, arch=arch, prediction_type=noise_scheduler.config.prediction_type,
                     unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=pipe.vae,
                     noise_scheduler=noise_scheduler, scheduler_config=sched_cfg,
                     native_resolution=NATIVE_RESOLUTION[arch])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
