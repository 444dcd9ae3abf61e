"""The math of one training step: noise, timesteps, epsilon/v target, MSE. No I/O, no optimizer."""

from __future__ import annotations

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


def target_for(noise_scheduler, prediction_type: str, latents, noise, timesteps) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def per_sample_loss(unet, noise_scheduler, prediction_type: str, latents: torch.Tensor, cond: torch.Tensor,
                    noise: torch.Tensor, timesteps: torch.Tensor, added_cond: dict | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and the target, one value per sample."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, cond, added_cond_kwargs=added_cond).sample
    target = target_for(noise_scheduler, prediction_type, latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))


def sample_noise(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, offset: float = 0.0):
    """Gaussian noise and uniform timesteps drawn from a CPU generator (same numbers on any device).

    `offset` adds per-channel constant noise (the "noise offset" trick), so the model can learn overall brightness.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(latents.device)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, t


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR+1) for v."""
    ac = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@torch.no_grad()
def fixed_loss(unet, noise_scheduler, prediction_type: str, latents: torch.Tensor, cond: torch.Tensor,
               added_cond: dict | None = None, timesteps=(100, 300, 500, 700, 900), seed: int = 1234) -> float:
    """Loss on fixed latents, noise and timesteps: comparable across a run, unlike the noisy training loss."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
        total += per_sample_loss(unet, noise_scheduler, prediction_type, latents, cond, noise, ts,
                                 added_cond).mean().item()
    return total / len(timesteps)
