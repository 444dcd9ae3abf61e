"""Validation (`--validation-split F`, `--validation-images DIR`, `--validate-every N`): the loss on held-out images
at fixed noise and timesteps, before the first step, every N steps and after the last; logged, plotted beside the
training loss, and the best step's adapter kept as `<output stem>-best.safetensors` (its step and loss in the
metadata).

The held-out images are either a share of the instance images, chosen by `--seed` and removed from training
(`split`), or a folder of their own (`from_folder`, captions beside them as in --images). Each one's loss is
`step.fixed_loss`: its latent's mean (no flip), its caption as is (no shuffling or dropout), 5 timesteps (100, 300,
500, 700, 900 of 1000) with noise from a seed of its own, so two validations differ only by the weights. Their
latents are computed before the first step (before the VAE may leave memory); their captions are among the
prompts the text caches hold (`caches.text_caches`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from sdlora.errors import SdloraError

SEED = 4321  # noise of held-out image i: SEED + i


def best_path(output: Path) -> Path:
    return output.with_name(output.stem + "-best.safetensors")


def held_out(cfg, instance: list, rules, resolution: int, buckets, say) -> tuple[list, list]:
    """(training, held-out) instance examples of --validation-split, or (all of them, --validation-images')."""
    if cfg.validation_images:
        return instance, from_folder(cfg, rules, resolution, buckets, say)
    return split(cfg, instance, say)


def split(cfg, instance: list, say) -> tuple[list, list]:
    """(training, held-out) instance examples: --validation-split's share of the images (at least one), chosen by
    --seed; every repeat of a held-out image leaves training with it."""
    if not cfg.validation_split:
        return instance, []
    paths = sorted({e.path for e in instance})
    n = max(1, math.floor(cfg.validation_split * len(paths) + 0.5))
    if n >= len(paths):
        raise SdloraError(f"--validation-split {cfg.validation_split:g} holds out {n} of {len(paths)} instance "
                          "images, leaving none to train on; lower it or add images")
    held = set(random.Random(cfg.seed + 20).sample(paths, n))
    say(f"validation: {n} of {len(paths)} instance images held out (--validation-split {cfg.validation_split:g})")
    return [e for e in instance if e.path not in held], [e for e in instance if e.path in held]


def from_folder(cfg, rules, resolution: int, buckets, say) -> list:
    """The examples of --validation-images (captions beside them, else --prompt)."""
    from sdlora.data.examples import build_examples
    from sdlora.data.images import checked_images

    images = checked_images(Path(cfg.validation_images), "--validation-images", cfg.skip_bad_images)
    say(f"validation: {len(images)} images in {cfg.validation_images}")
    return build_examples(images, rules, resolution, buckets, warn=False)


class Validator:
    """The validation loss of a run, computed on `loop`'s model (sdlora.train.loop._Loop: its denoiser, caches,
    conditioning, monitor and adapter writer), and the best step so far."""

    def __init__(self, loop):
        self.loop, self.examples = loop, loop.data.validation
        self.inputs = None  # per held-out image: scaled latent mean [1, C, h, w], loss mask or None
        self.best: tuple[int, float] | None = None  # (step, loss) of the best adapter written

    def due(self, step: int, steps: int) -> bool:
        every = self.loop.cfg.validate_every
        return step >= steps or bool(every and step % every == 0)

    @torch.no_grad()
    def loss(self) -> float:
        from sdlora.train import step as S

        loop = self.loop
        device, vae, latent = loop.env.device, loop.model.base.vae, loop.caches.latent
        if self.inputs is None:
            self.inputs = [(S.scale_latents(vae.config, latent.get(ex, False)[0][None].to(device)),
                            latent.mask(ex, False)[None].to(device) if ex.mask is not None else None)
                           for ex in self.examples]
        total = 0.0
        for i, (ex, (lat, mask)) in enumerate(zip(self.examples, self.inputs)):
            cond = loop.cond([ex], [ex.caption])
            total += S.fixed_loss(loop.opt.denoiser, loop.model.objective, lat, *cond, seed=SEED + i, mask=mask)
        return total / len(self.examples)

    def __call__(self, step: int) -> float:
        """The validation loss at `step` (logged); after the first step, the adapter of a new best is written."""
        from sdlora import outputs
        from sdlora.formats import meta
        from sdlora.train import optim

        loop = self.loop
        loop.set_train(False)
        try:
            with loop.env.accelerator.autocast(), optim.eval_weights(loop.opt.optimizer):
                value = self.loss()
                best = step > 0 and (self.best is None or value < self.best[1])
                if best:
                    self.best = (step, value)
                    with outputs.warn_on_disk_error(loop.say, f"best adapter at step {step}"):
                        loop.save_adapter(best_path(loop.cfg.output_path), loop.say if step >= loop.data.steps
                                          else _quiet, md=meta.best_metadata(step, value))
        finally:
            loop.set_train(True)
        loop.say(f"\nvalidation loss {value:.4f} at step {step}" + (" (best so far)" if best else ""))
        if loop.monitor:
            loop.monitor.validation(step, value)
        return value

    def state(self) -> tuple[dict, dict]:
        """(tensors, values) for a checkpoint: the best step and loss so far."""
        return {}, {"best": list(self.best) if self.best else None}

    def load(self, tensors: dict, values: dict) -> None:
        b = values.get("best")
        self.best = (int(b[0]), float(b[1])) if isinstance(b, list) and len(b) == 2 else None


def _quiet(*_a, **_k) -> None:
    pass
