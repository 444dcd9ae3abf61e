"""How a rectified-flow run (SD 3.x, FLUX.1) draws σ, the noise level of each sample (--timestep-sampling), with
kohya's meanings (sd-scripts library/flux_train_utils.py `get_noisy_model_input_and_timesteps`):

- uniform: σ ~ U(0, 1).
- sigmoid: σ = sigmoid(s·n), n ~ N(0, 1), s = --sigmoid-scale (a logit-normal density).
- logit-normal (the default): the same, then shifted by the model's own schedule, as the models were trained and
  diffusers' SD3/FLUX DreamBooth scripts draw it: SD 3.x by its `shift` (3), FLUX.1-dev by exp(μ) with μ linear in
  the number of image tokens (`calculate_shift`, the schedule's own numbers); a schedule without a shift: none.
- shift: sigmoid, then σ' = k·σ / (1 + (k - 1)·σ) with k = --discrete-flow-shift (default 3).
- flux-shift: sigmoid, then shifted by k = exp(μ), μ from the image-token count on kohya's fixed line through
  (256, 0.5) and (4096, 1.15).
"""

from __future__ import annotations

import math

import torch

DEFAULT = "logit-normal"
DEFAULT_FLOW_SHIFT = 3.0


def shifted(sigma: torch.Tensor, k: float) -> torch.Tensor:
    """σ shifted towards noise by k (k > 1) as SD3's and FLUX's schedules shift: kσ / (1 + (k - 1)σ)."""
    return k * sigma / (1 + (k - 1) * sigma)


def image_tokens(shape: torch.Size) -> int:
    """The transformer's image tokens for latents of `shape`: 2x2 patches."""
    return (shape[-2] // 2) * (shape[-1] // 2)


def flux_shift(shape: torch.Size) -> float:
    """kohya's flux-shift k = exp(μ), μ on the line through (256 tokens, 0.5) and (4096, 1.15)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # that line, with these default numbers

    return math.exp(calculate_shift(image_tokens(shape), 256, 4096, 0.5, 1.15))


def model_shift(config, shape: torch.Size) -> float:
    """The shift of a flow-matching schedule `config` for latents of `shape`: its `shift`, or, where it shifts
    dynamically (FLUX.1-dev), exp(μ) from its own numbers as FluxPipeline samples with."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = config
    return math.exp(calculate_shift(image_tokens(shape), c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                                    c.max_shift))


def draw(kind: str | None, shape: torch.Size, generator: torch.Generator, config, scale: float = 1.0,
         flow_shift: float | None = None) -> torch.Tensor:
    """σ in [0, 1), one per sample of latents of `shape`, drawn from the CPU `generator` as `kind` says (None: the
    default, logit-normal); `config`: the model's flow-matching schedule config."""
    kind = kind or DEFAULT
    n = shape[0]
    if kind == "uniform":
        return torch.rand((n,), generator=generator)
    from diffusers.training_utils import compute_density_for_timestep_sampling  # sigmoid(N(0, scale))

    sigma = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.0, logit_std=scale,
                                                  generator=generator)
    if kind == "sigmoid":
        return sigma
    if kind == "logit-normal":
        return shifted(sigma, model_shift(config, shape))
    if kind == "shift":
        return shifted(sigma, DEFAULT_FLOW_SHIFT if flow_shift is None else flow_shift)
    if kind == "flux-shift":
        return shifted(sigma, flux_shift(shape))
    raise ValueError(f"unknown timestep sampling {kind!r}")
