"""Training checkpoints that really resume: LoRA weights, optimizer, LR schedule, every RNG, the data position,
and a manifest of the settings and data they belong to. No pickle: tensors in safetensors, the rest in JSON.

A checkpoint folder `step-000100/` holds `state.safetensors`, `manifest.json`, and `adapter.safetensors` — the
adapter at that step in kohya format, usable on its own. `StopFlag` turns Ctrl-C into a stop at a step boundary,
so that what is saved then is a whole step.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdlora.errors import SdloraError, cause
from sdlora.formats.file_io import atomic_write_dir
from sdlora.train import option_checks

FORMAT = 1
MANIFEST_KEYS = ("format", "step", "identity", "data", "position", "optimizer_param_groups", "lr_scheduler",
                 "python_rng")

# Settings that define a run: a checkpoint made with other values cannot be continued as the same run.
IDENTITY = ("model", "prediction_type", "preset", "rank", "alpha", "no_text_encoder", "resolution", "batch_size",
            "grad_accum", "repeats", "lr", "te_lr", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
            "mixed_precision", "seed", "prompt", "trigger", "class_prompt", "prior_loss_weight", "no_flip",
            "buckets", "caption_dropout", "shuffle_tags", "keep_tags", "min_snr_gamma", "noise_offset", "network",
            "dora", "conv_rank", "conv_alpha", "lokr_factor", "optimizer", "optimizer_args")
# the noise and loss recipe (issue 20); a checkpoint older than a setting ran with its default (`load`)
IDENTITY += ("loss", "huber_c", "huber_schedule", "huber_scale", "zero_terminal_snr", "debiased_estimation",
             "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma", "timestep_sampling",
             "sigmoid_scale", "discrete_flow_shift")
IDENTITY += ("pivotal", "pivotal_init", "pivotal_lr", "pivotal_steps")  # --pivotal (issue 21)
IDENTITY += ("init_lora", "masks", "alpha_mask", "validation_split", "validation_images", "ema", "ema_update_every")
IDENTITY += option_checks.RESUME_IDENTITY  # clip skip, long prompts, LoRA+, dropout, schedules, targets


def checkpoint_root(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + "-checkpoints")


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file())


def save(folder: Path, *, step: int, identity: dict, data: dict, position: dict, params: dict[str, torch.Tensor],
         optimizer, lr_scheduler, rng: dict, adapter_writer, extra: tuple[dict, dict] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename). `extra`: (tensors, JSON values) of what else the
    run carries on (--ema's average, the best validation step), given back by `restore`'s `extra`."""
    folder = Path(folder)

    def fill(tmp: Path) -> None:
        tensors = {f"lora/{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
        osd = optimizer.state_dict()
        values: dict[str, object] = {}  # the optimizer's non-tensor state (step counts of some), JSON
        for idx, st in osd["state"].items():
            _split_state(f"{idx}", st, tensors, values)
        tensors["rng/train"] = rng["train"].contiguous()
        tensors["rng/torch"] = torch.get_rng_state().contiguous()
        if extra:
            tensors |= extra[0]
        save_file(tensors, tmp / "state.safetensors")
        manifest = {
            "format": FORMAT, "step": step, "identity": identity, "data": data, "position": position,
            "optimizer_param_groups": osd["param_groups"], "lr_scheduler": lr_scheduler.state_dict(),
            "python_rng": rng["python"], "optimizer_values": values,
        } | ({"extra": extra[1]} if extra else {})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_jsonable))
        adapter_writer(tmp / "adapter.safetensors")

    atomic_write_dir(folder, fill)
    return folder


def _split_state(prefix: str, st: dict, tensors: dict, values: dict) -> None:
    """An optimizer's per-parameter state: tensors to `tensors` as optim/<prefix>/<name> (nested dicts, e.g.
    bitsandbytes' quantisation state, as optim/<prefix>/<name>/<key>), everything else to `values` (JSON)."""
    for name, v in st.items():
        key = f"{prefix}/{name}"
        if isinstance(v, torch.Tensor):
            tensors[f"optim/{key}"] = v.detach().cpu().clone().contiguous()  # bitsandbytes shares its qmaps
        elif isinstance(v, dict):
            _split_state(key, v, tensors, values)
        elif v is None or isinstance(v, (bool, int, float, str)):
            values[key] = v
        else:
            raise SdloraError(f"optimizer state {key} is a {type(v).__name__}, which a checkpoint cannot hold "
                              "without pickle; use another --optimizer or --save-every 0")


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


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_rng_state(x) -> bool:  # random.getstate(): [version, [625 ints], gauss_next or None], as JSON keeps it
    return (isinstance(x, list) and len(x) == 3 and _count(x[0]) and isinstance(x[1], list)
            and all(_count(i) for i in x[1]) and (x[2] is None or isinstance(x[2], (int, float))))


# manifest field -> (test, what it must be): each field of a manifest is type-checked before any is used
MANIFEST_FIELDS = {
    "format": (lambda x: x == FORMAT, f"the number {FORMAT}"),
    "step": (_count, "a whole number >= 0"),
    "identity": (lambda x: isinstance(x, dict), "an object of settings"),
    "data": (lambda x: isinstance(x, dict) and all(isinstance(v, str) for v in x.values()),
             "an object of image digests"),
    "position": (lambda x: isinstance(x, dict) and all(_count(x.get(k)) for k in ("epoch", "batch", "micro")),
                 "an object of whole numbers epoch, batch, micro"),
    "optimizer_param_groups": (lambda x: isinstance(x, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(_count(i) for i in g["params"]) for g in x),
        "a list of parameter groups"),
    "lr_scheduler": (lambda x: isinstance(x, dict), "an object"),
    "python_rng": (_is_rng_state, "a Python random state"),
    "optimizer_values": (lambda x: isinstance(x, dict) and all(
        re.fullmatch(r"\d+(/[^/]+)+", k) and (v is None or isinstance(v, (bool, int, float, str)))
        for k, v in x.items()), "an object of 'N/name' values"),
}


def check_manifest(folder: Path, manifest) -> None:
    """Refuse, in one line naming the field, a manifest whose fields are missing or of the wrong type."""
    if not isinstance(manifest, dict):
        raise SdloraError(f"{folder}: corrupt checkpoint manifest.json (not a JSON object); resume from another "
                          "checkpoint or start a new run")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise SdloraError(f"{folder}: corrupt checkpoint manifest.json (missing or malformed: {', '.join(missing)}); "
                          "resume from another checkpoint or start a new run")
    if manifest["format"] != FORMAT:
        raise SdloraError(f"{folder}: checkpoint format {json.dumps(manifest['format'])[:40]} is not {FORMAT}; "
                          "start a new run")
    for key, (ok, what) in MANIFEST_FIELDS.items():
        if key in manifest and not ok(manifest[key]):
            raise SdloraError(f"{folder}: corrupt checkpoint manifest.json ({key} must be {what}, got "
                              f"{json.dumps(manifest[key])[:40]}); resume from another checkpoint or start a new run")


def _defaults() -> dict:
    from dataclasses import MISSING, fields

    from sdlora.config import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def load(folder: Path, identity: dict, data: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Manifest and tensors of a checkpoint, refusing one made for other settings or data (saying which)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdloraError(f"{folder}: corrupt checkpoint manifest.json ({cause(e)}); resume from another "
                          "checkpoint (they sit beside it) or start a new run") from e
    check_manifest(folder, manifest)
    then = _defaults() | manifest["identity"]  # a setting newer than the checkpoint: it ran with the default
    diffs = [f"{k}: checkpoint {then.get(k)!r}, now {identity.get(k)!r}"
             for k in identity if then.get(k) != identity.get(k)]
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
        raise SdloraError(f"{folder}: state.safetensors is truncated or corrupt ({cause(e)}); resume from "
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


def restore(folder: Path, identity: dict, data: dict, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler,
            rng: dict, extra=None) -> dict:
    """Load checkpoint `folder` into the LoRA `params`, the optimizer, the LR schedule and the RNGs (`rng`: the
    training torch.Generator as "train", the random.Random of captions as "python"; torch's global RNG too).
    Returns the manifest (step, data position). Refuses a checkpoint of other settings or data."""
    manifest, tensors = load(folder, identity, data)
    check_params(folder, tensors, params)
    for n, p in params.items():
        p.data.copy_(tensors[f"lora/{n}"])
    try:  # the manifest's types are checked; what the libraries make of the values may still not fit
        restore_optimizer(optimizer, manifest, tensors)
        lr_scheduler.load_state_dict(manifest["lr_scheduler"])
        rng["train"].set_state(tensors["rng/train"])
        torch.set_rng_state(tensors["rng/torch"])
        rng["python"].setstate(_tuples(manifest["python_rng"]))
        if extra is not None:  # save's `extra`: extra(tensors, values)
            extra(tensors, manifest.get("extra") if isinstance(manifest.get("extra"), dict) else {})
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as e:
        raise SdloraError(f"{folder}: checkpoint state does not fit this run ({cause(e, 120)}); resume from "
                          "another checkpoint or start a new run") from e
    return manifest


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def restore_optimizer(optimizer, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    found = [(k[len("optim/"):], v) for k, v in tensors.items() if k.startswith("optim/")]
    for key, v in found + list(manifest.get("optimizer_values", {}).items()):
        idx, *path = key.split("/")
        d = state.setdefault(int(idx), {})
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    optimizer.load_state_dict({"state": state, "param_groups": manifest["optimizer_param_groups"]})


class StopFlag:
    """Ctrl-C at a step boundary: SIGINT sets a flag (the loop stops at the next step boundary, so what is saved is
    a whole step and a resume continues exactly); a second SIGINT raises KeyboardInterrupt.
    Only in the main thread (signal handlers cannot be set elsewhere, e.g. inside the app's worker threads)."""

    def __init__(self, notice):
        self.set = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._notice = notice

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self._notice()

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
