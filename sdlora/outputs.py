"""Where a training run writes: checked before any heavy work, cleaned of killed saves' leftovers, and saved so
that a full disk never loses the trained weights.

- `check_paths(cfg)` (before anything loads): the adapter path, the checkpoint, sample and log folders, the cache
  and class-image folders must be creatable and writable, must not be an existing file that is not a sdlora adapter
  (unless --overwrite), and must not lie inside --images.
- `remove_stale_temps(cfg)`: temp files/folders of a save that was killed (`.name.XXXXXXXX.tmp`, `.step-N.XXXXXXXX`)
  are removed; young ones, which may belong to a run in progress, are only reported.
- `check_space(...)` (after the LoRA layers exist, before latents are cached): an estimate of the bytes the run
  writes, per file system, against the free space.
- `save_or_rescue(...)`: a save that fails anyway (disk full, file system gone read-only) is retried into a
  fallback folder, and the one-line error says where the weights are.
- `finish_before_interrupt(...)`: a Ctrl-C during a save lets the save finish, then says what was saved.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError, cause
from sdlora.guard import existing_ancestor, probe_writable

STALE_AGE_S = 300  # a temp file untouched this long belongs to a killed save, not to a save in progress
_TMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # formats.file_io.atomic_write (mkstemp)
_TMP_DIR = re.compile(r"^\.(?P<name>step-\d+)\.[A-Za-z0-9_]{8}$")  # formats.file_io.atomic_write_dir (mkdtemp)
MIB = 2**20


@dataclass
class Planned:
    """Everything a run may write, derived from the config alone."""

    adapter: Path
    checkpoints: Path
    loss_curve: Path
    samples: Path | None
    logs: Path | None
    cache: Path | None
    class_folder: Path | None  # only when class images are to be generated
    class_images_missing: int = 0  # how many the base model will generate
    extras: tuple[Path, ...] = ()  # files beside the adapter: <stem>-best (validation), <stem>-ema (--ema)

    def folders(self, out_flag: str = "--out") -> list[tuple[Path, str]]:
        """(folder, the option that moves it) for every folder the run writes into."""
        items = [(self.adapter.parent, out_flag), (self.checkpoints, out_flag)]
        items += [(self.samples, out_flag)] if self.samples else []
        items += [(self.logs, out_flag)] if self.logs else []
        items += [(self.cache, "--cache-dir (or --no-cache)")] if self.cache else []
        items += [(self.class_folder, "--class-images")] if self.class_folder else []
        return items


def planned(cfg) -> Planned:
    from sdlora.cache import default_cache_dir
    from sdlora.train.ckpt import checkpoint_root

    a = cfg.output_path
    cache = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    missing_class = cfg.num_class_images - _count_images(cfg.class_folder) if cfg.class_prompt else 0
    return Planned(
        adapter=a, checkpoints=checkpoint_root(a), loss_curve=a.with_name(a.stem + "-loss.png"),
        samples=a.with_name(a.stem + "-samples") if cfg.sample_every else None,
        logs=a.with_name(a.stem + "-logs") if cfg.log_with else None,
        cache=cache, class_folder=cfg.class_folder if missing_class > 0 else None,
        class_images_missing=max(0, missing_class),
        extras=tuple(a.with_name(f"{a.stem}-{k}.safetensors") for k, on in
                     (("best", cfg.validation_split or cfg.validation_images), ("ema", cfg.ema)) if on))


def _count_images(folder: Path | None) -> int:
    """Image files in `folder` by name (a class folder holding enough images is only read, never written)."""
    from sdlora.data.images import IMAGE_SUFFIXES

    try:
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    except (OSError, AttributeError):
        return 0


# ---------------------------------------------------------------- paths

def is_sdlora_adapter(path: Path) -> bool:
    """A .safetensors file whose metadata says sdlora wrote it (safetensors reads the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False
    return "sdlora_config" in md


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def check_paths(cfg) -> Planned:
    """Refuse, before any model loads, outputs that cannot be written or would damage something."""
    plan = planned(cfg)
    a = plan.adapter
    flag = "--out" if cfg.out else "--output-dir/--name"
    images = Path(cfg.images)
    if a.is_dir():
        raise SdloraError(f"{flag} {a} is a folder; pass a file path such as {a / 'lora.safetensors'}")
    # Nothing is written into the images folder itself (where a file would replace or join the training images).
    # A subfolder of it is fine: images are not searched recursively (`--images .` writes to ./output/).
    for p in [a, plan.checkpoints, plan.loss_curve] + [x for x in (plan.samples, plan.logs) if x]:
        if _same(p.parent, images) or _same(p, images):
            raise SdloraError(f"{flag} {a} is inside --images {images}: the run would write among the training "
                              "images; write it elsewhere, e.g. --output-dir output")
    if a.exists() and not a.is_file():
        raise SdloraError(f"{flag} {a} exists and is not a regular file; choose another path")
    if a.is_file() and not cfg.overwrite and not is_sdlora_adapter(a):
        raise SdloraError(f"{flag} {a} exists and is not a sdlora adapter; choose another path, or pass "
                          "--overwrite to replace it")
    if a.suffix.lower() != ".safetensors":
        raise SdloraError(f"{flag} {a}: the adapter file must end in .safetensors, e.g. "
                          f"{a.with_suffix('.safetensors').name if a.suffix else a.name + '.safetensors'}")
    _not_an_input(cfg, plan, flag)
    if not cfg.overwrite and not cfg.resume:
        _nothing_earlier(plan, flag)
    for p in (plan.checkpoints, plan.samples, plan.logs):
        if p is not None and p.exists() and not p.is_dir():
            raise SdloraError(f"{p} is in the way: the run writes a folder there; move that file or choose "
                              f"another {flag}")
    if plan.loss_curve.is_dir():
        raise SdloraError(f"{plan.loss_curve} is a folder in the way of the loss curve; "
                          f"move it or choose another {flag}")
    probed: set[Path] = set()  # each existing folder is probed once (several outputs share one)
    for folder, option in plan.folders(flag):
        anc = existing_ancestor(folder)
        if anc not in probed:
            probe_writable(folder, option)
            probed.add(anc)
    return plan


def _not_an_input(cfg, plan: Planned, flag: str) -> None:
    """The adapter is not the base model's file; class images are not generated into the training images."""
    from sdlora.guard import same_or_inside

    model = Path(cfg.model).expanduser()
    if model.exists() and (same_or_inside(plan.adapter, model) or same_or_inside(plan.checkpoints, model)):
        raise SdloraError(f"{flag} {plan.adapter} is the base model --model {cfg.model}: the run would replace it; "
                          "write the adapter elsewhere")
    images = Path(cfg.images)
    if plan.class_folder is not None and images.exists() and same_or_inside(plan.class_folder, images):
        raise SdloraError(f"--class-images {plan.class_folder} is the --images folder {images}: generated class "
                          "images would join the training set; pass another --class-images folder")


def _nothing_earlier(plan: Planned, flag: str) -> None:
    """Without --overwrite (or --resume, which continues the run that wrote them), a run replaces nothing an earlier
    run left: the adapter, its loss curve, checkpoints or sample grids."""
    def nonempty(folder: Path | None) -> bool:
        try:
            return folder is not None and folder.is_dir() and any(folder.iterdir())
        except OSError:
            return False

    earlier = [p for p in (plan.adapter, plan.loss_curve, *plan.extras) if p.is_file()]
    earlier += [p for p in (plan.checkpoints, plan.samples, plan.logs) if nonempty(p)]
    if not earlier:
        return
    if earlier[0] == plan.adapter:
        raise SdloraError(f"{flag} {plan.adapter} already exists (an earlier run's adapter); choose another {flag}, "
                          "or pass --overwrite to replace it")
    what = "checkpoints" if earlier[0] == plan.checkpoints else "files"
    hint = "--resume latest to continue that run, " if what == "checkpoints" else ""
    raise SdloraError(f"{flag} {plan.adapter}: {earlier[0]} is from an earlier run; pass {hint}--overwrite to "
                      f"replace its {what}, or choose another {flag}")


def run_lock(plan: Planned, flag: str):
    """The lock a training run holds on its adapter path while it runs (sdlora.guard.OutputLock): a second run
    writing the same adapter is refused instead of both saying "saved". Only the main process of a launch takes it."""
    from contextlib import nullcontext

    from sdlora.guard import OutputLock

    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return OutputLock(plan.adapter, flag) if rank == "0" else nullcontext()


# ---------------------------------------------------------------- leftovers of killed saves

def stale_temps(plan: Planned, now: float | None = None) -> tuple[list[Path], list[Path]]:
    """(stale, young) temp files/folders of sdlora's atomic writers in the folders this run writes to."""
    now = time.time() if now is None else now
    candidates: list[Path] = []
    mine = {plan.adapter.name, plan.loss_curve.name}

    def scan(folder: Path | None, want) -> None:
        if folder is None or not folder.is_dir():
            return
        try:
            entries = list(folder.iterdir())
        except OSError:
            return
        candidates.extend(p for p in entries if want(p))

    scan(plan.adapter.parent, lambda p: (m := _TMP_FILE.match(p.name)) is not None and m["name"] in mine)
    scan(plan.adapter.parent, lambda p: p.name.startswith(f".{plan.checkpoints.name}.") and p.is_dir())
    scan(plan.checkpoints, lambda p: _TMP_DIR.match(p.name) is not None or _TMP_FILE.match(p.name) is not None)
    scan(plan.samples, lambda p: _TMP_FILE.match(p.name) is not None)
    if plan.cache and plan.cache.is_dir():
        for sub in ("latents", "text"):
            for d in (plan.cache / sub).glob("??"):
                scan(d, lambda p: _TMP_FILE.match(p.name) is not None)
    stale, young = [], []
    for p in candidates:
        (stale if now - _newest_mtime(p) >= STALE_AGE_S else young).append(p)
    return stale, young


def _newest_mtime(p: Path) -> float:
    try:
        t = p.stat().st_mtime
        if p.is_dir():
            for q in p.rglob("*"):
                t = max(t, q.stat().st_mtime)
        return t
    except OSError:
        return 0.0


def remove_stale_temps(plan: Planned, log=print) -> list[Path]:
    """Delete the leftovers of killed saves; report young ones (maybe another run's save in progress)."""
    stale, young = stale_temps(plan)
    removed = []
    for p in stale:
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
        except OSError:
            young.append(p)
    if removed:
        from sdlora.data.images import display_name

        log(f"removed {len(removed)} temp file(s) left by an interrupted save: "
            + ", ".join(display_name(p, full=True) for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))
    if young:
        from sdlora.data.images import display_name

        log(f"note: {len(young)} recent temp file(s), maybe another run saving: "
            + ", ".join(display_name(p, full=True) for p in young[:3]) + "; left alone")
    return removed


# ---------------------------------------------------------------- disk space

def estimate_bytes(cfg, plan: Planned, n_params: int, n_tensors: int, latent_shapes: list[tuple[int, int]],
                   steps: int, resolution: int) -> dict[Path, int]:
    """Bytes the run may write, per folder (the folder's file system is looked up by the caller).

    `n_params` trainable LoRA parameters in `n_tensors` tensors; `latent_shapes` the (width, height) each
    example trains at (each cached once per flip)."""
    save_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[cfg.save_precision]
    adapter = n_params * save_bytes + n_tensors * 2 * 128 + 64 * 1024  # tensors, header entries, metadata
    out: dict[Path, int] = {}

    def add(folder: Path | None, n: int) -> None:
        if folder is not None and n > 0:
            out[folder] = out.get(folder, 0) + n

    # the final adapter (its old version stays until the new one is complete) and the loss curve
    add(plan.adapter.parent, adapter * (2 if plan.adapter.exists() else 1) + 64 * 1024)
    # checkpoints: fp32 weights + AdamW's two moments + the adapter + manifest; one more than kept while writing.
    # A Ctrl-C writes one even without --save-every.
    n_ckpt = 1
    if cfg.save_every:
        n_ckpt = max(1, steps // cfg.save_every)
        n_ckpt = min(n_ckpt, cfg.keep_last + 1) if cfg.keep_last else n_ckpt + 1
    add(plan.checkpoints, n_ckpt * (n_params * 12 + n_tensors * 3 * 128 + adapter + 256 * 1024))
    # sample grids (2 seeds × up to 3 prompts, half the raw RGB bytes as a PNG estimate), also in TensorBoard
    if cfg.sample_every:
        cell = max(resolution, 96)
        grid = (2 * cell) * ((cell + 14) * 3 + 14) * 3 // 2
        n_grids = steps // cfg.sample_every + 1
        add(plan.samples, n_grids * grid)
        add(plan.logs, n_grids * grid)
    if cfg.tensorboard:
        add(plan.logs, steps * 200 + 64 * 1024)
    # the latent cache: mean and std, 4 channels at 1/8 size, fp32, per flip
    if plan.cache is not None:
        flips = 1 if cfg.no_flip else 2
        add(plan.cache, sum(2 * 4 * (w // 8) * (h // 8) * 4 + 1024 for w, h in latent_shapes) * flips)
    if plan.class_folder is not None:
        add(plan.class_folder, plan.class_images_missing * resolution * resolution * 3 // 2)
    return out


def check_space(need: dict[Path, int], margin: int = MIB) -> None:
    """Refuse when a file system cannot hold what the run writes on it (`need`: folder -> bytes)."""
    per_fs: dict[int, list] = {}
    for folder, n in need.items():
        anc = existing_ancestor(folder)
        try:
            dev = anc.stat().st_dev
            free = shutil.disk_usage(anc).free
        except OSError:
            continue
        entry = per_fs.setdefault(dev, [0, free, anc, []])
        entry[0] += n
        entry[3].append(folder)
    for total, free, anc, folders in per_fs.values():
        if total + margin > free:
            raise SdloraError(f"not enough disk space: this run writes about {_size(total)} to {anc} (adapter, "
                              f"checkpoints, samples, latent cache), {_size(free)} is free; free some space, or "
                              "write elsewhere (--out, --cache-dir / --no-cache, fewer --keep-last/--sample-every)")


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------- saves that survive a full disk

_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO, errno.EFBIG}


def _disk_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _DISK_ERRORS
    # safetensors reports write failures as its own error type, with the OS message inside
    return type(e).__name__ == "SafetensorError" and any(
        s in str(e) for s in ("No space left", "Read-only file system", "Permission denied", "Disk quota",
                              "Input/output error", "File too large"))


def _reason(e: BaseException) -> str:
    """The OS's words for a failed write (safetensors wraps them in its own message)."""
    if getattr(e, "strerror", None):
        return e.strerror
    text = str(e)
    for phrase in ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded",
                   "Input/output error", "File too large"):
        if phrase in text:
            return phrase
    return cause(e, 120)


def rescue_folders() -> list[Path]:
    """Where a save that failed goes instead: $SDLORA_RESCUE_DIR if set, the temp folder, the home folder."""
    out = []
    if os.environ.get("SDLORA_RESCUE_DIR"):
        out.append(Path(os.environ["SDLORA_RESCUE_DIR"]))
    out += [Path(tempfile.gettempdir()) / "sdlora-rescued", Path.home() / "sdlora-rescued"]
    return out


def save_or_rescue(write, path: Path, what: str = "adapter") -> Path:
    """`write(path)`; if that fails for lack of space or permission, `write` into a fallback folder and raise a
    one-line error saying where the weights are. The trained state in memory is never touched by a failed write."""
    try:
        return write(path)
    except Exception as e:
        if not _disk_error(e):
            raise
        first = e
    reason = _reason(first)
    for folder in rescue_folders():
        target = folder / path.name
        try:
            if _inside(target, path.parent):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            saved = write(target)
        except Exception:
            continue
        raise SdloraError(f"could not write the {what} {path} ({reason}); it was saved to {saved} instead: "
                          "free space or fix permissions, then move it where you want it") from first
    raise SdloraError(f"could not write the {what} {path} ({reason}), "
                      f"nor into {', '.join(map(str, rescue_folders()))}; "
                      "free some disk space and run again") from first


@contextmanager
def warn_on_disk_error(say, what: str):
    """Run a side write (a sample grid, the loss curve, a checkpoint) so that a full disk or a read-only folder
    costs that write only, with a warning, never the training or the adapter."""
    try:
        yield
    except Exception as e:
        if not _disk_error(e):
            raise
        reason = _reason(e)
        say(f"warning: {what} not written ({reason}); training goes on and earlier files are kept: free some space")


_interrupt_guard: list[list] = []  # the active guard's Ctrl-C count (guards nest: a checkpoint holds an adapter)


@contextmanager
def finish_before_interrupt(say, what: str):
    """Let a save finish when Ctrl-C lands during it, then say what was saved and raise KeyboardInterrupt.
    Only in the main thread (signal handlers cannot be set elsewhere); nested guards defer to the outer one."""
    if _interrupt_guard or threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list = []

    def handler(signum, frame):
        if not hit:
            say(f"\nCtrl-C: finishing the save of the {what} first")
        hit.append(signum)

    old = signal.signal(signal.SIGINT, handler)
    _interrupt_guard.append(hit)
    try:
        yield
    finally:
        _interrupt_guard.pop()
        signal.signal(signal.SIGINT, old)
    if hit:
        say(f"Ctrl-C during the save: the {what} was saved completely")
        raise KeyboardInterrupt


def estimate_for_run(cfg, plan: Planned, adapted: dict, examples: list, steps: int, resolution: int) -> dict[Path, int]:
    """`estimate_bytes` for models carrying their LoRA layers and the run's examples."""
    params = [p for m in adapted.values() for p in m.parameters() if p.requires_grad]
    return estimate_bytes(cfg, plan, sum(p.numel() for p in params), len(params) * 3 // 2,
                          [e.size for e in examples], steps, resolution)
