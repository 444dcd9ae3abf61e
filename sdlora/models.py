"""Load a base model: a built-in one (`tiny`, `tiny-sd2`, `tiny-sdxl`, `toy`), a hub id, a local diffusers folder
or a single-file checkpoint.

The architecture (SD 1.x, SD 2.x, SDXL) and prediction type are detected from what is loaded, never asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("tiny", "tiny-sd2", "tiny-sdxl", "toy")

# Native training resolution per architecture (what the base model was trained at).
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024, "tiny": 64, "toy": 32}


def base_model_version(arch: str, prediction_type: str) -> str:
    """kohya's `ss_base_model_version` (sd_v1, sd_v2_512, sd_v2_768_v, sdxl_base_v1-0)."""
    from sdlora.formats.meta import base_model_version as bmv

    return bmv(arch, prediction_type)


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that training and generation use."""

    name: str  # what the user passed as --model
    arch: str  # "sd1", "sd2" or "sdxl"
    prediction_type: str  # "epsilon" or "v_prediction"
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    scheduler_config: dict = field(default_factory=dict)  # the model's own inference scheduler config
    native_resolution: int = 512
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG (with projection)
    tokenizer_2: object = None

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """The modules that LoRA adapts, by kohya component name: unet + te, or unet + te1 + te2 for SDXL."""
        if self.arch == "sdxl":
            return {"unet": self.unet, "te1": self.text_encoder, "te2": self.text_encoder_2}
        return {"unet": self.unet, "te": self.text_encoder}

    @property
    def text_encoders(self) -> dict[str, tuple[object, torch.nn.Module]]:
        """{kohya component: (tokenizer, text encoder)}."""
        if self.arch == "sdxl":
            return {"te1": (self.tokenizer, self.text_encoder), "te2": (self.tokenizer_2, self.text_encoder_2)}
        return {"te": (self.tokenizer, self.text_encoder)}

    @property
    def base_model_version(self) -> str:
        return base_model_version(self.arch, self.prediction_type)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (no copy)."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        if scheduler is None:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        if self.arch == "sdxl":
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                             text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                             tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


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
    raise SdloraError("checkpoint has no text-encoder weights of SD 1.x, SD 2.x or SDXL; pass a Stable Diffusion "
                      "checkpoint (an SDXL refiner or inpainting-only file is not supported)")


def detect_arch(unet_config, text_encoder_config) -> str:
    """Architecture of loaded diffusers components."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if text_encoder_config.hidden_act == "gelu" or unet_config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def load_base(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load `name`: a built-in model, a hub id, a local diffusers folder, or a single-file .safetensors checkpoint."""
    from sdlora.tiny import TINY_MODELS, TINY_RESOLUTION, tiny_components

    if name in TINY_MODELS:
        arch = TINY_MODELS[name]
        c = tiny_components(arch)
        base = BaseModel(name=name, arch=arch, prediction_type=c["noise_scheduler"].config.prediction_type,
                         native_resolution=TINY_RESOLUTION, unet=c["unet"], text_encoder=c["text_encoder"],
                         tokenizer=c["tokenizer"], vae=c["vae"], noise_scheduler=c["noise_scheduler"],
                         scheduler_config=c["scheduler_config"], text_encoder_2=c.get("text_encoder_2"),
                         tokenizer_2=c.get("tokenizer_2"))
        return _cast(base, dtype)

    if name == "toy":  # pretrained on a synthetic world (sdlora/toy); SD1-shaped, 32 px
        from sdlora.toy import load_toy

        return _cast(load_toy(), dtype)

    path = Path(name).expanduser()
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise SdloraError(f"{name}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise SdloraError(f"{name}: no such file; pass an existing .safetensors checkpoint, a diffusers folder or a hub id")
        arch = detect_checkpoint_arch(_safetensors_keys(path))
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(str(path), dtype=dtype)
        except Exception as e:  # diffusers raises many types; the user needs one line
            raise SdloraError(f"{name}: could not load the checkpoint ({_first_line(e)}); check the file is complete, "
                              "or pass a diffusers folder (diffusers fetches the model config from the hub the first "
                              "time; offline, convert it once with a connection)") from e
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


def _cast(base: BaseModel, dtype: torch.dtype) -> BaseModel:
    if dtype != torch.float32:
        for m in base.components.values():
            m.to(dtype)
        base.vae.to(dtype)
    return base


def from_pipeline(pipe, name: str) -> BaseModel:
    """Wrap a loaded diffusers pipeline, detecting the architecture and prediction type."""
    from diffusers import DDPMScheduler

    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder"):
        raise SdloraError(f"{name} is a {type(pipe).__name__}, not a Stable Diffusion 1.x/2.x/SDXL model")
    arch = detect_arch(pipe.unet.config, pipe.text_encoder.config)
    sched_cfg = dict(pipe.scheduler.config)
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    prediction = noise_scheduler.config.prediction_type
    native = NATIVE_RESOLUTION[arch]
    if arch == "sd2" and prediction == "epsilon":
        native = 512  # SD 2.x base (512, epsilon) vs SD 2.x (768, v-prediction)
    return BaseModel(name=name, arch=arch, prediction_type=prediction, unet=pipe.unet, text_encoder=pipe.text_encoder,
                     tokenizer=pipe.tokenizer, vae=pipe.vae, noise_scheduler=noise_scheduler, scheduler_config=sched_cfg,
                     native_resolution=native, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                     tokenizer_2=getattr(pipe, "tokenizer_2", None))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
