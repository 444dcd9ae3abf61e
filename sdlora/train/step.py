"""The math of one training step: text conditioning, latent scaling, noise and timesteps, the objective's target,
and the loss of a batch (prior-preservation weighting, min-SNR). No I/O, no optimizer, no data loading.

What a family trains on comes from its spec (`ArchSpec.objective`): "diffusion" is ε- or v-prediction on the
model's DDPM noise schedule. Another objective (rectified flow for SD3/FLUX) is one more class beside
`DiffusionObjective` and one more branch in `objective_for`; the loop and the loss do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(spec, text_encoders: list[tuple[object, torch.nn.Module]], prompts: list[str]):
    """What the denoiser is conditioned on, as family `spec` says: (hidden states, pooled embedding or None).

    Each text encoder gives its final hidden states (after the final layer norm: SD 1.x/2.x) or its penultimate
    layer (SDXL); several are put side by side; the one marked `pooled` also gives its projected pooled output.
    """
    hidden, pooled = [], None
    for t, (tok, te) in zip(spec.text_encoders, text_encoders):
        ids = _ids(tok, prompts).to(next(te.parameters()).device)
        if t.hidden == "final":
            out = te(ids)
            hidden.append(out[0])
        else:
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        if t.pooled:
            pooled = out[0]
    return (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)), pooled


def added_cond(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict:
    """SDXL-style added conditioning: the pooled text embedding and the size/crop numbers."""
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}


def scale_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the denoiser sees them: `(latents - shift_factor) * scaling_factor`; VAEs without a
    `shift_factor` (SD 1.x/2.x/XL: absent or None) are only scaled."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.scaling_factor


class DiffusionObjective:
    """ε- or v-prediction on a DDPM noise schedule (SD 1.x, 2.x, XL): `noise_scheduler` adds noise at integer
    timesteps; its config's `prediction_type` says what the denoiser predicts."""

    def __init__(self, noise_scheduler):
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` timesteps, uniform over the schedule, drawn from a CPU generator."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR+1) for v;
        the SNR is diffusers' `compute_snr`, as its own DreamBooth/LoRA scripts weight by it."""
        from diffusers.training_utils import compute_snr  # imports diffusers' models: seconds, so only when used

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


def objective_for(spec, noise_scheduler) -> DiffusionObjective:
    """The training objective of family `spec` over its noise schedule."""
    if spec.objective == "diffusion":
        return DiffusionObjective(noise_scheduler)
    raise ValueError(f"unsupported training objective {spec.objective!r}")


def sample_noise(latents: torch.Tensor, objective, generator: torch.Generator, offset: float = 0.0):
    """Gaussian noise and the objective's timesteps, drawn from a CPU generator (same numbers on any device).

    `offset` adds per-channel constant noise (the "noise offset" trick), so the model can learn overall brightness.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(latents.device)
    t = objective.timesteps(latents.shape[0], generator).to(latents.device)
    return noise, t


def per_sample_loss(denoiser, objective, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, added_cond: dict | None = None) -> torch.Tensor:
    """MSE between the denoiser's prediction and the objective's target, one value per sample."""
    noisy = objective.noisy(latents, noise, timesteps)
    pred = denoiser(noisy, timesteps, cond, added_cond_kwargs=added_cond).sample
    target = objective.target(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))


@dataclass
class Batch:
    """One forward of the denoiser: scaled latents of instance examples first, then class examples (prior
    preservation), with their conditioning, noise and timesteps."""

    latents: torch.Tensor
    cond: torch.Tensor  # text hidden states
    added_cond: dict | None  # SDXL's pooled text and size/crop numbers
    noise: torch.Tensor
    timesteps: torch.Tensor
    n_instance: int  # rows [0, n_instance) are instance examples, the rest class examples


def batch_loss(denoiser, objective, batches: list[Batch], prior_weight: float = 1.0,
               min_snr_gamma: float | None = None) -> torch.Tensor:
    """The training loss of one micro-step: per forward, the mean loss of its instance examples plus
    `prior_weight` times the mean loss of its class examples, each sample weighted by min-SNR-γ if set."""
    loss = torch.zeros((), device=batches[0].latents.device)
    for b in batches:
        losses = per_sample_loss(denoiser, objective, b.latents, b.cond, b.noise, b.timesteps, b.added_cond)
        if min_snr_gamma:
            losses = losses * objective.min_snr_weights(b.timesteps, min_snr_gamma).to(losses.device)
        if b.n_instance:
            loss = loss + losses[:b.n_instance].mean()
        if b.n_instance < len(losses):
            loss = loss + prior_weight * losses[b.n_instance:].mean()
    return loss


@torch.no_grad()
def fixed_loss(denoiser, objective, latents: torch.Tensor, cond: torch.Tensor, added_cond: dict | None = None,
               timesteps=(100, 300, 500, 700, 900), seed: int = 1234) -> float:
    """Loss on fixed latents, noise and timesteps: comparable across a run, unlike the noisy training loss."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        total += per_sample_loss(denoiser, objective, latents, cond, noise, ts, added_cond).mean().item()
    return total / len(timesteps)
