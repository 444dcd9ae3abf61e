"""Training checkpoints that really resume: LoRA weights, optimizer, LR schedule, every RNG, the data position,
and a manifest of the settings and data they belong to. No pickle: tensors in safetensors, the rest in JSON.

A checkpoint folder `step-000100/` holds `state.safetensors`, `manifest.json`, and `adapter.safetensors` — the
adapter at that step in kohya format, usable on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdlora.errors import SdloraError
from sdlora.formats.io import atomic_write_dir

FORMAT = 1
MANIFEST_KEYS = ("format", "step", "identity", "data", "position", "optimizer_param_groups", "lr_scheduler",
                 "python_rng")

# Settings that define a run: a checkpoint made with other values cannot be continued as the same run.
IDENTITY = ("model", "preset", "rank", "alpha", "no_text_encoder", "resolution", "batch_size", "grad_accum",
            "repeats", "lr", "te_lr", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
            "mixed_precision", "seed", "prompt", "trigger", "class_prompt", "prior_loss_weight", "no_flip",
            "buckets", "caption_dropout", "shuffle_tags", "keep_tags", "min_snr_gamma", "noise_offset")


def checkpoint_root(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + "-checkpoints")


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file())


def save(folder: Path, *, step: int, identity: dict, data: dict, position: dict, params: dict[str, torch.Tensor],
         optimizer, lr_scheduler, rng: dict, adapter_writer) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename)."""
    folder = Path(folder)

    def fill(tmp: Path) -> None:
        tensors = {f"lora/{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
        osd = optimizer.state_dict()
        for idx, st in osd["state"].items():
            for name, v in st.items():
                tensors[f"optim/{idx}/{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng/train"] = rng["train"].contiguous()
        tensors["rng/torch"] = torch.get_rng_state().contiguous()
        save_file(tensors, tmp / "state.safetensors")
        manifest = {
            "format": FORMAT, "step": step, "identity": identity, "data": data, "position": position,
            "optimizer_param_groups": osd["param_groups"], "lr_scheduler": lr_scheduler.state_dict(),
            "python_rng": rng["python"],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_jsonable))
        adapter_writer(tmp / "adapter.safetensors")

    atomic_write_dir(folder, fill)
    return folder


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return None  # callables in scheduler state (lr lambdas) are rebuilt from the config, not stored


def prune(root: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def resolve(resume: str, root: Path) -> Path:
    """The checkpoint folder `resume` names: a folder, or "latest" for the newest under `root`."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise SdloraError(f"--resume latest: no checkpoint in {root}; train with --save-every N first, "
                              "or drop --resume to start over")
        return found[-1]
    folder = Path(resume)
    if not (folder / "manifest.json").is_file() or not (folder / "state.safetensors").is_file():
        raise SdloraError(f"--resume {resume}: not a checkpoint folder (it needs manifest.json and "
                          "state.safetensors, as written by --save-every); a folder with no state is not a resume")
    return folder


def load(folder: Path, identity: dict, data: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Manifest and tensors of a checkpoint, refusing one made for other settings or data (saying which)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdloraError(f"{folder}: corrupt checkpoint manifest.json ({_first_line(e)}); resume from another "
                          "checkpoint (they sit beside it) or start a new run") from e
    missing = [k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(MANIFEST_KEYS)
    if missing or not isinstance(manifest.get("identity"), dict) or not isinstance(manifest.get("data"), dict):
        raise SdloraError(f"{folder}: corrupt checkpoint manifest.json (missing or malformed: "
                          f"{', '.join(missing) or 'identity/data'}); resume from another checkpoint or start a new run")
    if manifest.get("format") != FORMAT:
        raise SdloraError(f"{folder}: checkpoint format {manifest.get('format')} is not {FORMAT}; start a new run")
    diffs = [f"{k}: checkpoint {manifest['identity'].get(k)!r}, now {identity.get(k)!r}"
             for k in identity if manifest["identity"].get(k) != identity.get(k)]
    if diffs:
        raise SdloraError(f"cannot resume from {folder}: settings differ ({'; '.join(diffs[:4])}); "
                          "use the same settings or start a new run")
    if manifest["data"] != data:
        changed = sorted(set(manifest["data"].items()) ^ set(data.items()))
        names = sorted({Path(k).name for k, _ in changed})
        raise SdloraError(f"cannot resume from {folder}: the training images changed ({', '.join(names[:4])}); "
                          "restore them or start a new run")
    try:
        tensors = load_file(folder / "state.safetensors")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SdloraError(f"{folder}: state.safetensors is truncated or corrupt ({_first_line(e)}); resume from "
                          "another checkpoint (they sit beside it) or start a new run") from e
    needed = {"rng/train", "rng/torch"}
    if not needed <= set(tensors) or not any(k.startswith("lora/") for k in tensors):
        raise SdloraError(f"{folder}: state.safetensors lacks the LoRA weights or RNG states; resume from another "
                          "checkpoint or start a new run")
    return manifest, tensors


def check_params(folder: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Every trainable parameter has its tensor, of its shape, in the checkpoint."""
    for name, p in params.items():
        t = tensors.get(f"lora/{name}")
        if t is None or tuple(t.shape) != tuple(p.shape):
            raise SdloraError(f"{folder}: checkpoint does not match this model (lora/{name} "
                              f"{'missing' if t is None else tuple(t.shape)} vs {tuple(p.shape)}); "
                              "use the same settings or start a new run")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def restore_optimizer(optimizer, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": manifest["optimizer_param_groups"]})
