"""What the noise of a step is made of beyond plain Gaussian noise: multi-resolution (pyramid) noise
(--multires-noise-iterations/--multires-noise-discount), input perturbation (--ip-noise-gamma), and the
zero-terminal-SNR noise schedule (--zero-terminal-snr). Every random number comes from the run's CPU generator, so a
seed gives the same noise on any device and a resumed run continues it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseOptions:
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0

    @classmethod
    def of(cls, cfg) -> NoiseOptions:
        return cls(cfg.multires_noise_iterations, cfg.multires_noise_discount, cfg.ip_noise_gamma)


PLAIN = NoiseOptions()


def pyramid(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise as kohya makes it (custom_train_functions.py `pyramid_noise_like`, after Whitaker's
    "multi-resolution noise"): level i adds Gaussian noise drawn at 1/r^i of the size (r uniform in [2, 4) per
    level; level 0 at full size), bilinearly upsampled and weighted discount^i, stopping at a 1-pixel level; the sum
    is divided by its standard deviation (over the whole batch) to unit variance. Hand-written: no library has it;
    here the random numbers come from `generator` (kohya uses the global RNGs)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, hn, wn), generator=generator)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def draw(shape: torch.Size, generator: torch.Generator, offset: float, opts: NoiseOptions
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the noise of a step, the model's input noise where it differs from it: --ip-noise-gamma), on the CPU.

    Gaussian noise, plus per-channel constant noise × `offset` (the noise offset), made multi-resolution if asked;
    with input perturbation the model's input is noised with noise + γ·ξ (ξ fresh Gaussian noise) while the target
    stays `noise` (Ning et al. 2023, as kohya's --ip_noise_gamma)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    if opts.multires_iterations:
        noise = pyramid(noise, generator, opts.multires_iterations, opts.multires_discount)
    if not opts.ip_gamma:
        return noise, None
    return noise, noise + opts.ip_gamma * torch.randn(shape, generator=generator)


def zero_terminal_snr(noise_scheduler):
    """A copy of DDPM-style `noise_scheduler` whose betas are rescaled so that the last timestep's ᾱ is 0 (pure
    noise: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), by diffusers' own
    `rescale_betas_zero_snr` (kohya's --zero_terminal_snr computes the same betas)."""
    return type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
