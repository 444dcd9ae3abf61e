"""One typed config for training: defaults, help text and validation in one place.

The CLI flags are generated from these fields, a TOML file given with --config sets any of them, and flags
given on the command line override the file. Everything is checked before any model loads.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.lora.targets import PRESETS
from sdlora.models import DEFAULT_MODEL

MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp32", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    images: str = _f(MISSING, "folder of instance (subject) images")
    prompt: str = _f(MISSING, "instance prompt with the trigger word, e.g. 'sks dog'")
    model: str = _f(DEFAULT_MODEL, "base model: hub id, local diffusers folder, .safetensors checkpoint, or 'tiny'")
    output_dir: str = _f("output", "folder for the adapter file")
    name: str | None = _f(None, "output name (file <output_dir>/<name>.safetensors); default: the images folder's name")
    out: str | None = _f(None, "exact output file path (overrides --output-dir/--name)")
    preset: str = _f("default", "target modules: " + ", ".join(PRESETS), choices=tuple(PRESETS))
    rank: int = _f(4, "LoRA rank r")
    alpha: float | None = _f(None, "LoRA alpha; the delta is scaled by alpha/r (default: alpha = rank, scale 1)")
    no_text_encoder: bool = _f(False, "train the UNet only (no LoRA on the text encoder)")
    te_lr: float | None = _f(None, "text-encoder learning rate (default: --lr)")
    class_prompt: str | None = _f(None, "class prompt for prior preservation, e.g. 'a dog'")
    class_images: str | None = _f(None, "folder of class images for prior preservation")
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss")
    resolution: int | None = _f(None, "training resolution in pixels (default: the model's native size)")
    no_flip: bool = _f(False, "disable random horizontal flips")
    steps: int = _f(500, "optimizer steps")
    batch_size: int = _f(1, "instance images per step and device (class images are added on top)")
    grad_accum: int = _f(1, "gradient accumulation steps per optimizer step")
    lr: float = _f(1e-4, "learning rate (AdamW)")
    lr_scheduler: str = _f("constant", "learning-rate schedule after warmup", choices=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str = _f("no", "mixed precision for the frozen base", choices=MIXED_PRECISION)
    save_precision: str = _f("fp32", "dtype of the saved tensors", choices=SAVE_PRECISION)
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet and text encoder")
    seed: int = _f(0, "random seed: same seed, data and flags give the same adapter on CPU")
    skip_bad_images: bool = _f(False, "skip unreadable images with a warning instead of stopping")

    def __post_init__(self):
        def bad(flag, why):
            raise SdloraError(f"--{flag.replace('_', '-')} {why}")

        for f in ("images", "prompt"):
            if not getattr(self, f):
                bad(f, "is required")
        if self.rank < 1:
            bad("rank", f"must be at least 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            bad("alpha", f"must be positive, got {self.alpha}")
        for f in ("steps", "batch_size", "grad_accum"):
            if getattr(self, f) < 1:
                bad(f, f"must be at least 1, got {getattr(self, f)}")
        for f in ("lr",) + (("te_lr",) if self.te_lr is not None else ()):
            if not getattr(self, f) > 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            bad("warmup_steps", f"must be between 0 and --steps ({self.steps}), got {self.warmup_steps}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        if self.prior_loss_weight < 0:
            bad("prior_loss_weight", f"must be >= 0, got {self.prior_loss_weight}")
        if bool(self.class_prompt) != bool(self.class_images):
            raise SdloraError("prior preservation needs both --class-prompt and --class-images (a folder of class images)")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def output_path(self) -> Path:
        if self.out:
            return Path(self.out)
        name = self.name or Path(self.images).resolve().name or "lora"
        return Path(self.output_dir) / f"{name}.safetensors"

    def to_dict(self) -> dict:
        return asdict(self)


def load_toml(path: str | Path) -> dict:
    """Settings from a TOML file; unknown keys are an error (a typo must not pass silently)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SdloraError(f"--config {path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"--config {path}: invalid TOML ({e})") from e
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SdloraError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see `sdlora train --help`")
    return data


def make_config(values: dict) -> TrainConfig:
    """A validated TrainConfig; type errors become one-line errors."""
    known = {f.name: f for f in fields(TrainConfig)}
    missing = [n for n, f in known.items() if f.default is MISSING and n not in values]
    if missing:
        raise SdloraError(f"--{missing[0].replace('_', '-')} is required")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise SdloraError(f"invalid settings: {e}") from e
