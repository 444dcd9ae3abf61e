"""Latent and text-embedding caches keyed on content, in memory and on disk.

A latent is keyed on the image file's bytes, the size it is trained at, the flip, and a fingerprint of the VAE's
weights and config; a text embedding on the prompt and the text encoder's fingerprint. An edited image, another
bucket or another VAE therefore never reuses a stale entry, and an unchanged one is never encoded twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.data import Example, load_image
from sdlora.formats.io import atomic_save
from sdlora.train.step import encode_text

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdlora")


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


class _Store:
    """key -> tensors, in memory and (when `folder` is set) as one .safetensors file per key."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def get(self, key: str, compute) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        path = self.folder / key[:2] / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            try:
                value = load_file(path)
                self.hits += 1
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                value = None
            if value is not None:
                self.memory[key] = value
                return value
        value = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
        self.misses += 1
        if path is not None:
            atomic_save(value, path, {"sdlora_cache": CACHE_VERSION})
        self.memory[key] = value
        return value


class LatentCache:
    """VAE latent distributions (mean, std) per (image bytes, size, flip, VAE)."""

    def __init__(self, vae, folder: Path | None):
        self.vae = vae
        self.vae_id = fingerprint(vae)
        self.store = _Store(folder / "latents" if folder else None)
        self._digests: dict[Path, str] = {}

    def digest(self, path: Path) -> str:
        """sha256 of the image file, read once per run (the resume manifest reuses it)."""
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def key(self, ex: Example, flip: bool) -> str:
        parts = [CACHE_VERSION, self.digest(ex.path), f"{ex.size[0]}x{ex.size[1]}", str(flip), self.vae_id]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    @torch.no_grad()
    def get(self, ex: Example, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def encode():
            pixels = load_image(ex.path, ex.size)
            if flip:
                pixels = pixels.flip(-1)
            dist = self.vae.encode(pixels[None].to(self.vae.device, self.vae.dtype)).latent_dist
            return {"mean": dist.mean[0].float(), "std": dist.std[0].float()}

        v = self.store.get(self.key(ex, flip), encode)
        return v["mean"], v["std"]

    def sample(self, examples: list[Example], generator: torch.Generator, flips: bool = True) -> torch.Tensor:
        """A latent drawn from each example's cached distribution (unscaled, stacked), each flipped at random
        when `flips`; all numbers come from `generator`."""
        out = []
        for ex in examples:
            flip = bool(flips and torch.rand((), generator=generator) < 0.5)
            mean, std = self.get(ex, flip)
            out.append(mean + std * torch.randn(mean.shape, generator=generator))
        return torch.stack(out)


class EmbeddingCache:
    """Text conditioning (hidden states, and SDXL's pooled embedding) per (prompt, text encoders), for frozen
    text encoders."""

    def __init__(self, text_encoders: list[tuple[object, torch.nn.Module]], spec, folder: Path | None):
        self.text_encoders, self.spec = text_encoders, spec
        # T5's token count shapes its output (--t5xxl-max-token-length), so it is part of the key where it is set
        lengths = "".join(f"|{t.max_length}" for t in spec.text_encoders if t.max_length)
        self.te_id = hashlib.sha256(("".join(fingerprint(te) for _, te in text_encoders) + lengths).encode()).hexdigest()
        self.store = _Store(folder / "text" if folder else None)

    def key(self, prompt: str) -> str:
        return hashlib.sha256("|".join([CACHE_VERSION, prompt, self.te_id]).encode()).hexdigest()

    @torch.no_grad()
    def get(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        def compute(p):
            h, pooled = encode_text(self.spec, self.text_encoders, [p])
            return {"h": h[0].float()} | ({"p": pooled[0].float()} if pooled is not None else {})

        hs, ps = [], []
        for p in prompts:
            v = self.store.get(self.key(p), lambda: compute(p))
            hs.append(v["h"])
            ps.append(v.get("p"))
        return torch.stack(hs), (torch.stack(ps) if ps[0] is not None else None)
