"""Adapter-file metadata: the `ss_*` (kohya) and `modelspec.*` (SAI) keys of a training run, built from its typed
config plus a `RunStats`, and kohya's `sshs_*` hashes."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PureWindowsPath
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

import sdlora
from sdlora.archs import ArchSpec
from sdlora.bounds import SHOWN_CHARS

if TYPE_CHECKING:  # the config module imports models and LoRA targets; the metadata needs only its fields
    from sdlora.config import TrainConfig

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


@dataclass
class RunStats:
    """What a training run knows beyond its config: the base model, the data and the steps done."""

    spec: ArchSpec  # family of the base model
    base_model_version: str  # kohya's `ss_base_model_version` (BaseModel.base_model_version)
    model_name: str  # what the user passed as --model
    targets: dict[str, str]  # adapted component -> what the preset targets in it
    resolution: int
    steps: int
    num_images: int  # instance images × repeats
    num_reg_images: int  # class images (prior preservation)
    tag_frequency: dict[str, dict[str, int]]  # {dataset folder name: {tag: count}}
    started: datetime
    clip_skip: int | None = None
    variant: str | None = None  # BaseModel.variant: decides `modelspec.architecture` where versions share a value


# settings that hold a local path (or a model name that may be one): stored by `portable` only
PATH_SETTINGS = ("images", "class_images", "output_dir", "out", "cache_dir", "model", "name")


def portable(value):
    """A path as metadata may keep it: as typed when relative and inside the folder it was typed in (`data/dog`,
    a hub id, a built-in model's name), else its last part only, as kohya's `ss_dataset_dirs` keeps folder names:
    a shared file never carries the local absolute path (`/home/me/photos/dog` -> `dog`)."""
    if not isinstance(value, str) or not value:
        return value
    win = PureWindowsPath(value)  # parses / and \ alike: `C:\Users\me\dog` and `/home/me/dog`
    if win.drive or win.root or value.startswith("~") or ".." in win.parts:
        return win.name
    return value


def build(cfg: TrainConfig, run: RunStats) -> dict[str, str]:
    """The metadata sdlora writes: the `ss_*` keys A1111, kohya's tools and civitai read, plus modelspec, plus
    sdlora's own (the whole config as JSON)."""
    now = datetime.now(timezone.utc)
    output_name = cfg.output_path.stem
    trigger = cfg.trigger_text
    te_lr = (cfg.te_lr or cfg.lr) if len(run.targets) > 1 else None  # only when a text encoder is adapted
    prior_loss_weight = cfg.prior_loss_weight if run.num_reg_images else None
    md = {
        "ss_network_module": run.spec.kohya_network_module,
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(float(cfg.network_alpha)),
        "ss_network_args": json.dumps({"preset": cfg.preset, "targets": run.targets} | _control_args(cfg)),
        "ss_base_model_version": run.base_model_version,
        "ss_v2": str(run.spec.is_v2),
        "ss_sd_model_name": portable(run.model_name),
        "ss_output_name": output_name,
        "ss_resolution": f"({run.resolution}, {run.resolution})",
        "ss_steps": str(run.steps),
        "ss_max_train_steps": str(run.steps),
        "ss_num_train_images": str(run.num_images),
        "ss_num_reg_images": str(run.num_reg_images),
        "ss_tag_frequency": json.dumps(run.tag_frequency),
        "ss_learning_rate": str(cfg.lr),
        "ss_unet_lr": str(cfg.lr),
        "ss_text_encoder_lr": str(te_lr) if te_lr is not None else "None",
        "ss_seed": str(cfg.seed),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_prior_loss_weight": str(prior_loss_weight) if prior_loss_weight is not None else "None",
        "ss_training_started_at": str(run.started.timestamp()),
        "ss_training_finished_at": str(now.timestamp()),
        "ss_training_comment": f"trigger: {trigger}" if trigger else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": run.spec.modelspec_architecture(run.base_model_version, run.variant),
        # kohya's sai_model_spec: SDXL is Stability's generative-models implementation, SD 1/2 diffusers'
        "modelspec.implementation": run.spec.modelspec_implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": f"{run.resolution}x{run.resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "sdlora_version": sdlora.__version__,
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_enable_bucket": str(cfg.buckets),
        # storage precision of the frozen base the adapter was trained against ("default": the compute dtype)
        "sdlora_base_precision": cfg.base_precision or "default",
        "sdlora_te_precision": cfg.te_precision or "default",
        "sdlora_config": json.dumps({k: portable(v) if k in PATH_SETTINGS else v for k, v in cfg.to_dict().items()
                                     if k != "resume"}, default=str),
    }
    md |= recipe_metadata(cfg, run.spec)
    return md | _controls_metadata(cfg)


def recipe_metadata(cfg: TrainConfig, spec: ArchSpec) -> dict[str, str]:
    """The noise and loss options as kohya records them (train_network.py; flux_train_network.py for the timestep
    sampling of rectified-flow models): `str()` of its values, "None" where an option is off."""
    md = {
        "ss_loss_type": cfg.loss,
        "ss_huber_schedule": cfg.huber_schedule, "ss_huber_c": str(cfg.huber_c), "ss_huber_scale": str(cfg.huber_scale),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_debiased_estimation": str(cfg.debiased_estimation),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount),
        "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
    }
    if spec.objective == "flow":
        md |= {"ss_timestep_sampling": (cfg.timestep_sampling or "logit-normal").replace("-", "_"),
               "ss_sigmoid_scale": str(cfg.sigmoid_scale),
               "ss_discrete_flow_shift": str(cfg.discrete_flow_shift if cfg.discrete_flow_shift is not None
                                             else 3.0 if cfg.timestep_sampling == "shift" else None)}
    return md


def _controls_metadata(cfg: TrainConfig) -> dict[str, str]:
    """Issue 20's text and dropout options as kohya records them: numbers, or "None" when not set."""
    def num(v):
        return "None" if v is None else str(v)

    return {"ss_clip_skip": num(cfg.clip_skip), "ss_max_token_length": num(cfg.max_token_length),
            "ss_network_dropout": num(cfg.network_dropout)}


def _control_args(cfg: TrainConfig) -> dict[str, str]:
    """kohya's `network_args` that LoRA+, rank/module dropout and --targets/--exclude stand for, each a string as
    kohya writes them (loraplus_lr_ratio, rank_dropout, module_dropout; include_patterns/exclude_patterns as list
    literals, lora_anima's spelling)."""
    from sdlora.lora.targets import regexes

    args = {}
    if cfg.loraplus_ratio is not None:
        args["loraplus_lr_ratio"] = str(cfg.loraplus_ratio)
    for name in ("rank_dropout", "module_dropout"):
        if getattr(cfg, name) is not None:
            args[name] = str(getattr(cfg, name))
    if cfg.targets:
        args["include_patterns"] = json.dumps(regexes(cfg.targets))
    if cfg.exclude:
        args["exclude_patterns"] = json.dumps(regexes(cfg.exclude))
    return args


def dataset_metadata(dataset, repeats: int, instance: list, classes: list, trigger: str = "") -> dict[str, str]:
    """kohya's dataset keys (library/train_util.py, DreamBooth datasets): `ss_dataset_dirs` and `ss_reg_dataset_dirs`
    ({folder name: {"n_repeats", "img_count"}}), `ss_num_train_images` / `ss_num_reg_images` counting repeats, and
    `ss_tag_frequency` per folder (instance and class). `dataset` is an `sdlora.data.kohya_folders.Dataset`,
    `repeats` the run's --repeats (it multiplies each folder's N), `instance`/`classes` the examples trained on
    (their final captions). Without a `trigger` (--trigger/--prompt), the trigger phrase is the concept folders' \
words."""
    captions: dict = {}
    for e in list(instance) + list(classes):
        captions.setdefault(e.path.parent, []).append(e.caption)

    def dirs(concepts) -> dict:
        return {c.name: {"n_repeats": c.repeats * repeats, "img_count": len(c.images)} for c in concepts}

    def counted(concepts) -> int:
        return sum(c.repeats * repeats * len(c.images) for c in concepts)

    freq = {}
    for c in list(dataset.concepts) + list(dataset.classes):
        tags: dict[str, int] = {}
        for cap in captions.get(c.folder, []):
            for tag in (t.strip()[:SHOWN_CHARS] for t in cap.split(",")):  # a tag is a few words
                if tag:
                    tags[tag] = tags.get(tag, 0) + 1
        freq[c.name] = tags
    md = {"ss_dataset_dirs": json.dumps(dirs(dataset.concepts)),
          "ss_reg_dataset_dirs": json.dumps(dirs(dataset.classes)),
          "ss_num_train_images": str(counted(dataset.concepts)), "ss_num_reg_images": str(counted(dataset.classes)),
          "ss_tag_frequency": json.dumps(freq)}
    words = [c.prompt for c in dataset.concepts if c.prompt]
    if words and not trigger:
        md["modelspec.trigger_phrase"] = ", ".join(words)
        md["ss_training_comment"] = "trigger: " + ", ".join(words)
    return md


def controls_metadata(cfg: TrainConfig, lineage: tuple[str, str] | None) -> dict[str, str]:
    """The training controls of issue 20, as kohya records them where it has them (`ss_masked_loss`,
    `ss_validation_*`), else as sdlora's own keys: --init-lora's lineage (file name and sha256), the mask source,
    the EMA decay."""
    md = {"ss_masked_loss": str(bool(cfg.masks or cfg.alpha_mask))}
    if cfg.masks or cfg.alpha_mask:
        md["sdlora_masks"] = "alpha channel" if cfg.alpha_mask else portable(cfg.masks)
    if cfg.validation_split or cfg.validation_images:
        md |= {"ss_validation_split": str(cfg.validation_split), "ss_validation_seed": str(cfg.seed),
               "ss_validate_every_n_steps": str(cfg.validate_every or None)}
        if cfg.validation_images:
            md["sdlora_validation_images"] = portable(cfg.validation_images)
    if lineage:
        md |= {"sdlora_init_lora": lineage[0], "sdlora_init_lora_sha256": lineage[1]}
    if cfg.ema:
        md |= {"sdlora_ema_decay": str(cfg.ema), "sdlora_ema_update_every": str(cfg.ema_update_every)}
    return md


def best_metadata(step: int, loss: float) -> dict[str, str]:
    """What `<output>-best.safetensors` adds: the step it was saved at and its validation loss."""
    return {"sdlora_best_step": str(step), "sdlora_best_validation_loss": f"{loss:.6g}"}


def ema_metadata(updates: int) -> dict[str, str]:
    """What `<output>-ema.safetensors` adds: the number of updates averaged."""
    return {"sdlora_ema_updates": str(updates)}
