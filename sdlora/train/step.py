"""The math of one training step: noise, timesteps, epsilon/v target, MSE. No I/O, no optimizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states [B, 77, d] for `prompts` (padded to the tokenizer's maximum, truncated)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(_ids(tokenizer, prompts).to(device))[0]


def encode_text(text_encoders: list[tuple[object, torch.nn.Module]], arch: str, prompts: list[str]):
    """What the UNet is conditioned on: (hidden states, pooled embedding or None).

    SD 1.x/2.x: the last hidden state of the one text encoder. SDXL, as its pipeline does: the penultimate hidden
    states of both encoders side by side, and the projected pooled output of the second.
    """
    if arch != "sdxl":
        tok, te = text_encoders[0]
        return encode_prompts(tok, te, prompts), None
    hidden, pooled = [], None
    for tok, te in text_encoders:
        device = next(te.parameters()).device
        out = te(_ids(tok, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's (bigG's) projected pooled output
    return torch.cat(hidden, dim=-1), pooled


def sdxl_added_cond(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict:
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
