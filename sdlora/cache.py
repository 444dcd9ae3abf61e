"""Latent and text-embedding caches keyed on content, in memory and on disk.

A latent is keyed on the image file's bytes, the size it is trained at, the flip, and a fingerprint of the VAE's
weights and config; a text embedding on the prompt and the text encoder's fingerprint. An edited image, another
bucket or another VAE therefore never reuses a stale entry, and an unchanged one is never encoded twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from sdlora.data.examples import Example
from sdlora.data.images import display_name, load_image
from sdlora.errors import SdloraError, cause
from sdlora.formats.file_io import atomic_save, atomic_write
from sdlora.train.step import encode_text

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDLORA_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdlora")


_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors$")


def cache_entries(root: Path) -> list[Path]:
    """The cache entries under `root`: `latents|text/XX/<sha256>.safetensors` files whose header carries sdlora's
    cache marker (`sdlora_cache`). Nothing else counts, whatever folder `--dir`/$SDLORA_CACHE names."""
    from safetensors import safe_open

    out = []
    for sub in ("latents", "text"):
        for p in sorted((root / sub).glob("??/*.safetensors")) if (root / sub).is_dir() else []:
            if not (_ENTRY.match(p.name) and p.name.startswith(p.parent.name) and p.is_file()):
                continue
            try:
                with safe_open(str(p), framework="pt") as f:
                    if "sdlora_cache" in (f.metadata() or {}):
                        out.append(p)
            except Exception:  # not a safetensors file: not an entry (a damaged entry is rebuilt, not listed)
                continue
    return out


def clear_entries(root: Path, entries: list[Path]) -> int:
    """Delete `entries`, then the folders of the cache layout they leave empty; returns how many other files were
    found in those folders and left alone."""
    for p in entries:
        p.unlink(missing_ok=True)
    for d in [*sorted(root.glob("latents/??")), *sorted(root.glob("text/??")), root / "latents", root / "text"]:
        try:
            d.rmdir()  # only if nothing else is left in it
        except OSError:
            pass
    try:
        if is_cache_dir(root) and [p.name for p in root.iterdir()] == [CACHE_MARKER]:
            (root / CACHE_MARKER).unlink()  # sdlora's own marker, once nothing else is left
        root.rmdir()
    except OSError:
        pass
    others = [p for p in root.rglob("*") if p.is_file() and p.name != CACHE_MARKER] if root.is_dir() else []
    return len(others)


# Config entries that say where a model came from or which library wrote it, not what it computes. diffusers adds
# private `_...` keys (`_use_default_values` lists the defaulted keys in set order, which varies per process);
# transformers adds `_name_or_path` (the folder or hub id), `transformers_version` and attention-backend choices.
_NOT_RESULT_KEYS = {"transformers_version", "diffusers_version", "torch_dtype", "dtype"}


def result_config(cfg) -> dict:
    """The part of a module's config that changes what it computes: private and provenance keys dropped."""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})  # transformers config / diffusers FrozenDict

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not str(k).startswith("_") and k not in _NOT_RESULT_KEYS}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x

    return clean(cfg)


@contextmanager
def computed_as_stored(module: torch.nn.Module):
    """An entry is computed in the module's own dtype, with the run's autocast (`--mixed-precision`) turned off: it
    is keyed on the weights and their dtype only, so it must not depend on the run that happened to compute it (a
    bf16-autocast run's latents were once served to a later fp32 run of the same VAE). Runs of either precision
    share the entries; each run casts them to its own dtype when it uses them."""
    device = next(module.parameters()).device
    with torch.autocast(device.type, enabled=False):
        yield


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of what determines a module's outputs: its config (private/provenance keys dropped) and every
    parameter's and buffer's name, dtype and bytes. Identifies the weights, not the name or the process."""
    h = hashlib.sha256()
    h.update(json.dumps(result_config(getattr(module, "config", None)), sort_keys=True, default=str).encode())
    for name, p in module.state_dict().items():
        if "lora_" in name:
            continue
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer itself, not a copy
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The cache root carries a CACHEDIR.TAG (https://bford.info/cachedir/: backup tools skip such folders) naming
# sdlora: `sdlora cache --clear` deletes only a folder that has it, never one it is merely pointed at.
CACHE_MARKER = "CACHEDIR.TAG"
_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
_MARKER_TEXT = (_SIGNATURE + b"\n# This folder is a cache made by sdlora (latents and text embeddings, keyed on "
                b"content).\n# `sdlora cache --clear` may delete it. For information about cache directory tags, "
                b"see https://bford.info/cachedir/\n")


def is_cache_dir(path) -> bool:
    """Does `path` carry sdlora's cache marker (a regular file CACHEDIR.TAG with the standard signature naming
    sdlora)? Only such a folder is a cache sdlora may clear."""
    marker = Path(path) / CACHE_MARKER
    try:
        if not marker.is_file() or marker.is_symlink():
            return False
        with open(marker, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(_SIGNATURE) and b"sdlora" in head


def mark_cache_dir(path) -> None:
    """Write the cache marker into `path` (made if missing), unless it is there already."""
    path = Path(path)
    if not is_cache_dir(path):
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CACHE_MARKER, lambda tmp: Path(tmp).write_bytes(_MARKER_TEXT))


def entry_problem(value: dict[str, torch.Tensor], expect: dict[str, tuple[int, ...]]) -> str | None:
    """Why a cache entry read from disk cannot be used, or None: its tensor names, dtype (float32), shapes and
    finiteness must be what this run computes."""
    if set(value) != set(expect):
        return f"it holds {sorted(value)}, not {sorted(expect)}"
    for name, shape in expect.items():
        t = value[name]
        if t.dtype != torch.float32:
            return f"{name} is {str(t.dtype).removeprefix('torch.')}, not float32"
        if tuple(t.shape) != tuple(shape):
            return f"{name} has shape {list(t.shape)}, not {list(shape)}"
        if not torch.isfinite(t).all():
            return f"{name} holds NaN or Inf"
    return None


def once(log):
    """`log`, but only its first message: a damaged cache is said once per run, not once per entry."""
    said = []

    def say(msg: str) -> None:
        if not said:
            said.append(msg)
            log(msg)

    return say


class _Store:
    """key -> tensors, in memory and (when `folder` is set) as one .safetensors file per key under the cache
    `root`. An entry read from disk is used only if `entry_problem` finds nothing wrong with it; a damaged one is
    recomputed (and said, through `log`), never trained on."""

    def __init__(self, folder: Path | None, root: Path | None = None, log=print):
        self.folder, self.root, self.log = folder, root, log
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = self.rebuilt = 0
        self._marked = False

    def _read(self, path: Path, expect) -> dict[str, torch.Tensor] | None:
        try:
            with safe_open(path, "pt") as f:
                value = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            why = entry_problem(value, expect() if callable(expect) else expect)
        except Exception as e:  # truncated or garbled: safetensors raises several types
            why = f"unreadable: {cause(e, 80)}"
        if why is None:
            return value
        self.rebuilt += 1
        if self.rebuilt == 1:
            self.log(f"note: damaged cache entry {path.name} ({why}) is recomputed, never trained on; so is any "
                     "other damaged entry")
        return None

    def get(self, key: str, compute, expect) -> dict[str, torch.Tensor]:
        """The entry `key`: from memory, from disk when it has the `expect`ed names and shapes ({name: shape}, or a
        callable giving it), else `compute()`d (and written)."""
        if key in self.memory:
            return self.memory[key]
        path = self.folder / key[:2] / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            value = self._read(path, expect)
            if value is not None:
                self.hits += 1
                self.memory[key] = value
                return value
        value = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
        self.misses += 1
        if path is not None:
            if not self._marked and self.root is not None:
                mark_cache_dir(self.root)
                self._marked = True
            atomic_save(value, path, {"sdlora_cache": CACHE_VERSION})
        self.memory[key] = value
        return value


class LatentCache:
    """VAE latent distributions (mean, std) per (image bytes, size, flip, VAE)."""

    def __init__(self, vae, folder: Path | None, log=print):
        self.vae = vae
        self.vae_id = fingerprint(vae)
        self.store = _Store(folder / "latents" if folder else None, folder, log)
        self._digests: dict[Path, str] = {}
        cfg = vae.config  # the latent of a W×H image: latent_channels × H/f × W/f, f = 2^(downsampling blocks)
        self.channels, self.factor = cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1)

    def shape(self, ex: Example) -> tuple[int, int, int]:
        """The shape of the latent of `ex` (mean and std alike)."""
        return self.channels, ex.size[1] // self.factor, ex.size[0] // self.factor

    def digest(self, path: Path) -> str:
        """sha256 of the image file, read once per run (the resume manifest reuses it)."""
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def key(self, ex: Example, flip: bool) -> str:
        parts = [CACHE_VERSION, self.digest(ex.path), f"{ex.size[0]}x{ex.size[1]}", str(flip), self.vae_id]
        if ex.mask is not None:  # the entry holds the mask too (sdlora/data/masks.py): keyed on its bytes
            parts.append("mask:" + (str(ex.mask) if isinstance(ex.mask, str) else self.digest(ex.mask)))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    @torch.no_grad()
    def get(self, ex: Example, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def encode():
            pixels = load_image(ex.path, ex.size)
            if flip:
                pixels = pixels.flip(-1)
            with computed_as_stored(self.vae):
                dist = self.vae.encode(pixels[None].to(self.vae.device, self.vae.dtype)).latent_dist
            out = {"mean": dist.mean[0].float(), "std": dist.std[0].float()}
            if ex.mask is not None:
                from sdlora.data import masks

                out["mask"] = masks.to_latent(masks.load_mask(ex.mask, ex.path, ex.size), out["mean"].shape[-2:], flip)
            if not all(torch.isfinite(t).all() for t in out.values()):
                raise SdloraError(f"the VAE encoded {display_name(ex.path, full=True)} to NaN/Inf latents: the VAE "
                                  "is broken or overflows (an fp16 VAE); use a fp32 VAE or check the model")
            return out

        shape = self.shape(ex)
        expect = {"mean": shape, "std": shape} | ({"mask": (1, *shape[1:])} if ex.mask is not None else {})
        v = self.store.get(self.key(ex, flip), encode, expect)
        return v["mean"], v["std"]

    def mask(self, ex: Example, flip: bool) -> torch.Tensor:
        """The loss mask of `ex` on its latent grid [1, h, w] (flipped with it); ones when it has none."""
        if ex.mask is None:
            return torch.ones(1, *self.shape(ex)[1:])
        self.get(ex, flip)
        return self.store.memory[self.key(ex, flip)]["mask"]

    def sample(self, examples: list[Example], generator: torch.Generator, flips: bool = True,
               with_masks: bool = False):
        """A latent drawn from each example's cached distribution (unscaled, stacked), each flipped at random
        when `flips`; all numbers come from `generator`. `with_masks`: (latents, their loss masks [B, 1, h, w] or
        None when no example has one)."""
        out, masks = [], []
        for ex in examples:
            flip = bool(flips and torch.rand((), generator=generator) < 0.5)
            mean, std = self.get(ex, flip)
            out.append(mean + std * torch.randn(mean.shape, generator=generator))
            masks.append(self.mask(ex, flip) if with_masks else None)
        if not with_masks:
            return torch.stack(out)
        return torch.stack(out), (torch.stack(masks) if any(e.mask is not None for e in examples) else None)


class EmbeddingCache:
    """Text conditioning (hidden states, and SDXL's pooled embedding) per (prompt, text encoders), for frozen
    text encoders."""

    def __init__(self, text_encoders: list[tuple[object, torch.nn.Module]], spec, folder: Path | None, log=print):
        self.text_encoders, self.spec = text_encoders, spec
        # T5's token count shapes its output (--t5xxl-max-token-length), so it is part of the key where it is set
        lengths = "".join(f"|{t.max_length}" for t in spec.text_encoders if t.max_length)
        # so do --clip-skip and --max-token-length's chunks (absent from the key when not set: caches stay valid)
        lengths += "".join(f"|skip{t.clip_skip}|x{t.chunks}" for t in spec.text_encoders
                           if t.clip_skip is not None or t.chunks != 1)
        self.te_id = hashlib.sha256(
            ("".join(fingerprint(te) for _, te in text_encoders) + lengths).encode()).hexdigest()
        self.store = _Store(folder / "text" if folder else None, folder, log)
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of an entry, from encoding the empty prompt once (when the first entry is read from
        disk): what every entry of these text encoders must look like."""
        if self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in self._compute("").items()}
        return self._shapes

    @torch.no_grad()
    def _compute(self, prompt: str) -> dict[str, torch.Tensor]:
        with computed_as_stored(self.text_encoders[0][1]):
            h, pooled = encode_text(self.spec, self.text_encoders, [prompt])
        out = {"h": h[0].float()} | ({"p": pooled[0].float()} if pooled is not None else {})
        if not all(torch.isfinite(t).all() for t in out.values()):
            raise SdloraError(f"the text encoder gave NaN/Inf for the prompt '{prompt[:80]}': it is broken or "
                              "overflows (fp16); check the model")
        if self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in out.items()}
        return out

    def key(self, prompt: str) -> str:
        return hashlib.sha256("|".join([CACHE_VERSION, prompt, self.te_id]).encode()).hexdigest()

    @torch.no_grad()
    def get(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hs, ps = [], []
        for p in prompts:
            v = self.store.get(self.key(p), lambda p=p: self._compute(p), self.shapes)
            hs.append(v["h"])
            ps.append(v.get("p"))
        return torch.stack(hs), (torch.stack(ps) if ps[0] is not None else None)
