"""The run's caches and what leaves memory once they are full.

Latents are always cached (memory, and disk unless --no-cache); prompts when their text encoder is frozen. A
latent or prompt embedding is computed when a step first needs it (disk-cache hits are read then too), so the first
step does not wait for the whole data set. Once every latent the run can need is cached the VAE leaves memory, and
so do frozen text encoders once every prompt is (only when prompts are a fixed set: no tag shuffling); sample grids
and the caller get them back, reloaded (`Caches.whole`, `Caches.restore_released`). Which noise and timesteps a step
draws never depends on what was cached. A multi-process run encodes every latent up front on the main process (the
others read the disk cache) and keeps its modules.

A big model loaded piece by piece (SD3/FLUX, sdlora/bigload.py) defers its denoiser: `encode_first` encodes every
prompt, and the frozen text encoders whose outputs are all cached (T5-XXL above all) leave memory before the
denoiser is read, so the two never share the host's memory.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora import quant
from sdlora.cache import EmbeddingCache, LatentCache, default_cache_dir, once
from sdlora.config import TrainConfig
from sdlora.models import BUILTIN_MODELS, load_base
from sdlora.train import memory, pivotal
from sdlora.train.prepare import Env, Examples, Model, precision_of, trained_text_encoders


@dataclass
class TextCaches:
    """The text caches, and the prompt keys they must hold before their encoders may leave memory (None / {}: the
    prompts are not a fixed set)."""
    text: EmbeddingCache | None  # every text encoder frozen: their outputs together
    frozen: dict[str, EmbeddingCache]  # text encoders trained: the ones that stay frozen (T5-XXL), each alone
    prompts: list[str]  # every prompt the run can train on
    pending_text: set | None
    pending_frozen: dict[str, set]
    lazy: bool  # one process: entries are computed when first needed, and modules leave memory once done
    damage: object  # says a damaged cache entry, once per run (every cache shares it)

    def release(self, tes: dict) -> None:
        """Free frozen text encoders whose every prompt embedding is cached."""
        if self.pending_text and _all_in(self.pending_text, self.text.store.memory):
            self.pending_text = None
            for m in tes.values():
                memory.release(m)
        for c, keys in list(self.pending_frozen.items()):  # T5-XXL beside trained CLIP encoders
            if _all_in(keys, self.frozen[c].store.memory):
                del self.pending_frozen[c]
                memory.release(tes[c])


def _cache_dir(cfg: TrainConfig) -> Path | None:
    return None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def text_caches(cfg: TrainConfig, env: Env, model: Model, data: Examples, damage=None) -> TextCaches:
    base, spec = model.base, model.base.spec
    damage = damage or once(env.say)
    trained = trained_text_encoders(cfg, model) | pivotal.encoders(cfg, model)  # new tokens: not cacheable either
    train_te = bool(trained)
    # with text encoders trained, the ones that stay frozen (SD3/FLUX's T5-XXL) have their outputs cached alone
    frozen = {t.component: EmbeddingCache([base.text_encoders[t.component]],
                                          dataclasses.replace(spec, text_encoders=(t,)), _cache_dir(cfg), damage)
              for t in spec.text_encoders if train_te and t.component not in trained}
    text = None if train_te else EmbeddingCache(list(base.text_encoders.values()), spec, _cache_dir(cfg), damage)
    lazy = env.accelerator.num_processes == 1
    prompts = sorted({e.caption for e in data.instance + data.classes + data.validation}
                     | ({""} if cfg.caption_dropout else set()))
    pending_text = ({text.key(p) for p in prompts} if lazy and text is not None and not cfg.shuffle_tags else None)
    pending_frozen = ({c: {cache.key(p) for p in prompts} for c, cache in frozen.items()}
                      if lazy and not cfg.shuffle_tags else {})
    return TextCaches(text, frozen, prompts, pending_text, pending_frozen, lazy, damage)


def encode_first(cfg: TrainConfig, env: Env, model: Model, data: Examples) -> TextCaches:
    """A deferred denoiser: every prompt encoded, the text encoders done with released, then the denoiser read."""
    base = model.base
    text = text_caches(cfg, env, model, data)
    if text.text is not None and text.pending_text:
        for p in text.prompts:
            text.text.get([p])
    for c, cache in text.frozen.items():
        if c in text.pending_frozen:
            for p in text.prompts:
                cache.get([p])
    text.release(model.tes)
    gone = [a for a, m in base.modules.items() if a not in base.deferred and memory.released(m)]
    env.say(f"text: {len(text.prompts)} prompts encoded first" + (f"; {', '.join(gone)} left memory before the "
                                                                 f"{base.spec.denoiser} loads" if gone else ""))
    base.materialise()
    base.denoiser.requires_grad_(False)
    return text


class Caches:
    """The latent cache and the text caches of a run, and which frozen modules are out of memory because of them."""

    def __init__(self, cfg: TrainConfig, env: Env, model: Model, latent: LatentCache, text: TextCaches,
                 pending_latents: set | None):
        self.cfg, self.env, self.model = cfg, env, model
        self.latent, self.text = latent, text
        self.pending_latents = pending_latents  # what the run can ask for: every example in every flip
        self.vae_offloaded = False  # a multi-process run's VAE, on the CPU once every latent is cached

    def say_latents(self) -> None:
        st, folder = self.latent.store, _cache_dir(self.cfg)
        self.env.say(f"latents: {st.hits} from cache, {st.misses} encoded"
                     + (f" ({st.rebuilt} damaged entries recomputed)" if st.rebuilt else "")
                     + (f" ({folder})" if folder else ""))

    def release(self) -> None:
        """Free the VAE once every latent is cached, and frozen text encoders once every prompt embedding is."""
        if self.pending_latents and _all_in(self.pending_latents, self.latent.store.memory):
            self.pending_latents = None
            self.say_latents()
            memory.release(self.model.base.vae)
        self.text.release(self.model.tes)

    @contextmanager
    def whole(self):
        """Inside (a sample grid): every module whole on the training device, released ones reloaded and an
        offloaded VAE back; released and offloaded again after."""
        base, device = self.model.base, self.env.device
        gone = self.restore_released()
        try:
            with memory.on_device(base.vae, device, self.vae_offloaded):
                yield
        finally:
            for attr in gone:
                memory.release(base.modules[attr])

    def restore_released(self, device: torch.device | None = None) -> list[str]:
        """Reload the weights of released modules (onto `device`, default the training device); their names."""
        base = self.model.base
        gone = [a for a, m in base.modules.items() if memory.released(m)]
        if gone:
            fresh = _load_frozen(self.cfg, base, gone)
            for a in gone:
                memory.restore(base.modules[a], fresh[a], device or self.env.device)
        return gone


def fill(cfg: TrainConfig, env: Env, model: Model, data: Examples, text: TextCaches | None) -> Caches:
    """The caches of the run (`text`: those `encode_first` filled already, else made now); with several processes
    every latent is encoded here, up front."""
    damage = text.damage if text else once(env.say)
    latent = LatentCache(model.base.vae, _cache_dir(cfg), damage)
    text = text or text_caches(cfg, env, model, data, damage)
    flips = (False,) if cfg.no_flip else (False, True)
    examples = data.instance + data.classes
    pending = {latent.key(ex, f) for ex in examples for f in flips} if text.lazy else None
    caches = Caches(cfg, env, model, latent, text, pending)
    if text.lazy:
        return caches
    if env.main:
        for ex in tqdm(examples, desc="caching latents", unit="img", leave=False):
            for f in flips:
                latent.get(ex, f)
        caches.say_latents()
    env.accelerator.wait_for_everyone()
    # latents are cached: the VAE leaves the GPU until a sample grid needs it (a cache miss encodes on the CPU)
    caches.vae_offloaded = memory.offload(model.base.vae, env.device)
    return caches


def _all_in(keys: set, cached: dict) -> bool:
    return len(cached) >= len(keys) and all(k in cached for k in keys)


def _load_frozen(cfg: TrainConfig, base, attrs: list[str]) -> dict:
    """Modules `attrs` of the base model loaded again, as load_model loaded them (at --te-precision too): from a
    diffusers folder or hub id one component each (its weights memory-mapped); a built-in model or single file is
    rebuilt whole, and the rest dropped."""
    if base.loaders:  # loaded piece by piece (sdlora/bigload.py): each component alone, the same way
        return {a: base.loaders[a]() for a in attrs}
    name = cfg.model
    path = Path(name).expanduser()
    precision = precision_of(cfg)
    if name in BUILTIN_MODELS or path.suffix.lower() == ".safetensors":
        fresh = load_base(name, prediction_type=cfg.prediction_type, precision=precision)
        return {a: fresh.modules[a] for a in attrs}
    source = str(path) if path.exists() else name
    out = {a: type(base.modules[a]).from_pretrained(source, subfolder=a) for a in attrs}
    for a, m in out.items():  # released modules are frozen text encoders (and the VAE, never stored narrower)
        if cfg.te_precision and any(quant.stored(s) for s in base.modules[a].modules()):
            quant.quantize_(m, cfg.te_precision, precision.compute)
    return out
