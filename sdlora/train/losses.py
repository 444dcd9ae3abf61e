"""The loss of one prediction against its target (--loss l2|huber|smooth_l1, kohya's formulas), Huber's threshold
schedule (--huber-schedule), and the debiased-estimation weights (--debiased-estimation).

Hand-written: diffusers' training scripts have only MSE and a Huber without kohya's schedules; these are kohya's
(sd-scripts library/train_util.py `conditional_loss`, `get_huber_threshold_if_needed`; custom_train_functions.py
`apply_debiased_estimation`), on the objective's own noise-to-signal ratio so that they apply to rectified flow too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOptions:
    kind: str = "l2"  # l2 | huber | smooth_l1
    huber_c: float = 0.1
    huber_schedule: str = "snr"  # constant | exponential | snr
    huber_scale: float = 1.0
    debiased: bool = False

    @classmethod
    def of(cls, cfg) -> LossOptions:
        return cls(cfg.loss, cfg.huber_c, cfg.huber_schedule, cfg.huber_scale, cfg.debiased_estimation)


L2 = LossOptions()


def elementwise(pred: torch.Tensor, target: torch.Tensor, kind: str, c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each element (kohya's `conditional_loss` with reduction "none"): l2 (p - y)²; huber
    2c(sqrt((p - y)² + c²) - c), the pseudo-Huber loss (≈ (p - y)² for |p - y| ≪ c, ≈ 2c|p - y| above);
    smooth_l1 2(sqrt((p - y)² + c²) - c). `c`: one threshold per sample."""
    d2 = (pred - target) ** 2
    if kind == "l2":
        return d2
    c = c.to(d2).view(-1, *([1] * (d2.dim() - 1)))
    root = torch.sqrt(d2 + c ** 2) - c
    if kind == "huber":
        return 2 * c * root
    if kind == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss {kind!r}")


def huber_threshold(opts: LossOptions, objective, timesteps: torch.Tensor) -> torch.Tensor:
    """Huber's c per sample, as kohya schedules it: constant c·scale; exponential scale·c^(t/T) (t/T: the step's
    noise fraction, σ for rectified flow); snr (1 - c)/(1 + nsr)² + c with nsr = sqrt((1 - ᾱ)/ᾱ) the noise-to-signal
    ratio (σ/(1 - σ) for rectified flow; kohya's snr schedule covers DDPM schedules only)."""
    if opts.huber_schedule == "constant":
        return torch.full(timesteps.shape, opts.huber_c * opts.huber_scale, dtype=torch.float32)
    if opts.huber_schedule == "exponential":
        return torch.exp(math.log(opts.huber_c) * objective.noise_fraction(timesteps)) * opts.huber_scale
    if opts.huber_schedule == "snr":
        return (1 - opts.huber_c) / (1 + objective.noise_to_signal(timesteps)) ** 2 + opts.huber_c
    raise ValueError(f"unknown Huber schedule {opts.huber_schedule!r}")


def per_sample(pred: torch.Tensor, target: torch.Tensor, opts: LossOptions, objective, timesteps: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample: the elementwise loss, times `weight` where given (a per-element weight, e.g. a
    loss mask, broadcast to the prediction), averaged over all but the batch dimension."""
    c = huber_threshold(opts, objective, timesteps.cpu()) if opts.kind != "l2" else None
    loss = elementwise(pred.float(), target.float(), opts.kind, c)
    if weight is not None:
        loss = loss * weight.to(loss)
    return loss.mean(dim=list(range(1, loss.dim())))


def debiased_weights(objective, timesteps: torch.Tensor) -> torch.Tensor:
    """kohya's debiased estimation (Yu et al. 2024): 1/sqrt(SNR) for ε-prediction, 1/(SNR + 1) for v-prediction,
    with the SNR capped at 1000 (it is infinite at t = 0)."""
    snr = torch.clamp(objective.snr(timesteps), max=1000)
    return 1 / (snr + 1) if objective.prediction_type == "v_prediction" else 1 / torch.sqrt(snr)
