"""The math of one training step: text conditioning, latent scaling, noise and timesteps, the objective's target,
and the loss of a batch (prior-preservation weighting, min-SNR). No I/O, no optimizer, no data loading.

What a family trains on comes from its spec (`ArchSpec.objective`): "diffusion" is ε- or v-prediction on the
model's DDPM noise schedule (`DiffusionObjective`, SD 1.x/2.x/XL); "flow" is rectified flow (`FlowObjective`,
SD 3.x and FLUX.1). An objective draws timesteps, noises latents, names the target and calls its denoiser; the
loop and the loss do not know which one they run. An objective also carries the run's noise and loss recipe
(`noise`, `loss`: sdlora/train/recipe.py sets them from the config; plain Gaussian noise and MSE by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.lora.tokens import expand
from sdlora.train import long_prompts
from sdlora.train import losses as L
from sdlora.train import noise as N
from sdlora.train import timesteps as T

RECORDED = 4096  # timesteps kept for the TensorBoard histogram between two reads (`take_drawn`)


def _ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    n = min(max_length or tokenizer.model_max_length, tokenizer.model_max_length)
    prompts = expand(tokenizer, prompts)  # --pivotal: the trigger as its new tokens (lora/tokens.py)
    return tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


NAMED_CAPTIONS = 10  # captions a long-caption warning names (the longest first); the rest are counted


def long_captions(spec, text_encoders: list[tuple[object, torch.nn.Module]], captions: dict[str, str]) -> str | None:
    """A warning naming the captions ({caption: file name}) longer than a text encoder reads, or None: each
    encoder reads only its first N tokens and ignores the rest."""
    over, limits = {}, {}
    for t, (tok, _) in zip(spec.text_encoders, text_encoders):
        n = long_prompts.token_limit(t, tok)
        lengths = tok(list(captions), truncation=False, verbose=False).input_ids
        for caption, ids in zip(captions, lengths):
            if len(ids) > n:
                over[caption] = max(over.get(caption, 0), len(ids))
                limits[t.kind.upper()] = n
    if not over:
        return None
    longest = sorted(over.items(), key=lambda kv: -kv[1])
    named = ", ".join(f"{captions[c]}: {n:,} tokens" for c, n in longest[:NAMED_CAPTIONS])
    more = f", and {len(longest) - NAMED_CAPTIONS} more" if len(longest) > NAMED_CAPTIONS else ""
    reads = ", ".join(f"{k} the first {n}" for k, n in limits.items())
    clips = spec.clip_hidden()
    longer = (" or pass --max-token-length 225" if clips and clips[0].chunks < 3
              and not any(t.sequence_join for t in spec.text_encoders) else "")
    return (f"warning: {len(over)} caption(s) are longer than the text encoder reads ({named}{more}); only the "
            f"first tokens are read ({reads}) and the rest is ignored; shorten them{longer}")


def encode_text(spec, text_encoders: list[tuple[object, torch.nn.Module]], prompts: list[str],
                given: dict | None = None):
    """What the denoiser is conditioned on, as family `spec` says: (hidden states, pooled embedding or None).

    Each CLIP encoder gives its final hidden states (after the final layer norm: SD 1.x/2.x) or its penultimate
    layer (SDXL, SD3), or none (FLUX's CLIP-L); these are put side by side. A `sequence_join` encoder (T5-XXL)
    follows them along the sequence, after they are zero-padded to its width (SD3), or alone (FLUX). The pooled
    outputs of the encoders marked `pooled` are put side by side (SDXL: bigG's; SD3: CLIP-L's and bigG's).
    The same computation as the diffusers pipelines' `encode_prompt` (tests/test_dit.py checks it against them).
    `given`: {component: (hidden or None, pooled or None)} of encoders whose outputs are known (cached): not run.
    """
    side, seq, pooled = [], [], []
    for t, (tok, te) in zip(spec.text_encoders, text_encoders):
        if given and t.component in given:
            h, p = given[t.component]
            if h is not None:
                (seq if t.sequence_join else side).append(h)
            if p is not None and t.pooled:
                pooled.append(p)
            continue
        if t.kind == "t5":
            seq.append(te(_ids(tok, prompts, t.max_length).to(next(te.parameters()).device))[0])
            continue
        h, p = long_prompts.encode_clip(t, tok, te, prompts)  # its layer (--clip-skip), its chunks
        if h is not None:
            side.append(h)
        if t.pooled:
            pooled.append(p)
    hidden = torch.cat(side, dim=-1) if len(side) > 1 else (side[0] if side else None)
    if seq:
        if hidden is not None:
            hidden = F.pad(hidden, (0, seq[0].shape[-1] - hidden.shape[-1]))
        hidden = torch.cat(([hidden] if hidden is not None else []) + seq, dim=-2)
    return hidden, (torch.cat(pooled, dim=-1) if len(pooled) > 1 else (pooled[0] if pooled else None))


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

    noise, loss = N.PLAIN, L.L2
    drawn_name = "timestep"

    def __init__(self, noise_scheduler):
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        self.drawn: list[torch.Tensor] = []

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ/(1 - ᾱ) at each timestep (diffusers' `compute_snr`)."""
        from diffusers.training_utils import compute_snr  # imports diffusers' models: seconds, so only when used

        return compute_snr(self.scheduler, timesteps.cpu())

    def noise_to_signal(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt((1 - ᾱ)/ᾱ): the noise's scale over the signal's in x_t = sqrt(ᾱ)·x0 + sqrt(1 - ᾱ)·ε."""
        return self.snr(timesteps).rsqrt()

    def noise_fraction(self, timesteps: torch.Tensor) -> torch.Tensor:
        """t/T: where in the schedule a timestep is."""
        return timesteps.cpu().float() / self.scheduler.config.num_train_timesteps

    def timesteps(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """One timestep per sample of latents of `shape`, uniform over the schedule, drawn from a CPU generator."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],), generator=generator)

    def fixed_timesteps(self, t: int, n: int, device) -> torch.Tensor:
        """`n` copies of timestep `t` of 1000 (the fixed-noise evaluation)."""
        return torch.full((n,), t, dtype=torch.long, device=device)

    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                added_cond: dict | None) -> torch.Tensor:
        return denoiser(noisy, timesteps, cond, added_cond_kwargs=added_cond).sample

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR+1) for v;
        the SNR is diffusers' `compute_snr`, as its own DreamBooth/LoRA scripts weight by it."""
        snr = self.snr(timesteps).to(timesteps.device)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


class FlowObjective:
    """Rectified flow (SD 3.x, FLUX.1): x_σ = (1 - σ)·x0 + σ·ε and the transformer predicts the velocity ε - x0.

    σ is drawn as the models were trained: a logit-normal density (SD3 paper §5.1; diffusers'
    `compute_density_for_timestep_sampling`, as its SD3/FLUX DreamBooth scripts draw it) shifted towards noise,
    σ' = s·σ / (1 + (s - 1)·σ), with s the schedule's `shift` (SD 3.x: 3), or, where the schedule shifts
    dynamically (FLUX.1-dev), s = exp(μ) with μ linear in the number of image tokens (diffusers' `calculate_shift`,
    what FluxPipeline samples with). The transformer sees σ·1000 (SD3) or σ (FLUX, which scales it itself); FLUX
    takes 2x2 latent patches as tokens with position ids, and dev a distilled guidance value (`train_guidance`).
    """

    prediction_type = "flow"
    drawn_name = "sigma"
    noise, loss = N.PLAIN, L.L2
    sampling: str | None = None  # --timestep-sampling (sdlora/train/timesteps.py); None: logit-normal, shifted
    sigmoid_scale: float = 1.0
    flow_shift: float | None = None

    def __init__(self, noise_scheduler, spec, denoiser_config):
        self.scheduler = noise_scheduler
        self.config = noise_scheduler.config
        self.packed = spec.packed_latents
        self.guidance = spec.train_guidance if getattr(denoiser_config, "guidance_embeds", False) else None
        self.drawn: list[torch.Tensor] = []

    def shift(self, shape: torch.Size) -> float:
        return T.model_shift(self.config, shape)

    def timesteps(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """σ in [0, 1), one per sample of latents of `shape`, from a CPU generator, as --timestep-sampling says."""
        return T.draw(self.sampling, shape, generator, self.config, self.sigmoid_scale, self.flow_shift)

    def noise_to_signal(self, sigmas: torch.Tensor) -> torch.Tensor:
        """σ/(1 - σ): the noise's scale over the signal's in x_σ = (1 - σ)·x0 + σ·ε."""
        s = sigmas.cpu().float()
        return s / (1 - s)

    def noise_fraction(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas.cpu().float()

    def fixed_timesteps(self, t: int, n: int, device) -> torch.Tensor:
        return torch.full((n,), t / 1000, dtype=torch.float32, device=device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        raise ValueError("min-SNR weighting is for ε/v-prediction models, not rectified flow")

    def predict(self, denoiser, noisy: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                added_cond: dict | None) -> torch.Tensor:
        pooled = added_cond["pooled"] if added_cond else None
        if not self.packed:
            return denoiser(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=cond,
                            pooled_projections=pooled).sample
        from diffusers import FluxPipeline  # its static pack/unpack helpers: the token layout FLUX was trained on

        b, c, h, w = noisy.shape
        tokens = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=noisy.device)
        out = denoiser(hidden_states=tokens, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=cond, txt_ids=txt_ids, img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def objective_for(spec, noise_scheduler, denoiser_config=None):
    """The training objective of family `spec` over its noise schedule."""
    if spec.objective == "diffusion":
        return DiffusionObjective(noise_scheduler)
    if spec.objective == "flow":
        return FlowObjective(noise_scheduler, spec, denoiser_config)
    raise ValueError(f"unsupported training objective {spec.objective!r}")


def draw_noise(latents: torch.Tensor, objective, generator: torch.Generator, offset: float = 0.0):
    """(noise, timesteps, the model's input noise or None), drawn from a CPU generator (same numbers on any device)
    as the objective's noise options say (sdlora/train/noise.py: multires noise, input perturbation).

    `offset` adds per-channel constant noise (the "noise offset" trick), so the model can learn overall brightness.
    The timesteps are kept for the TensorBoard histogram (`take_drawn`)."""
    noise, given = N.draw(latents.shape, generator, offset, objective.noise)
    t = objective.timesteps(latents.shape, generator)
    if len(objective.drawn) < RECORDED:
        objective.drawn.append(t)
    device = latents.device
    return noise.to(device), t.to(device), (given.to(device) if given is not None else None)


def sample_noise(latents: torch.Tensor, objective, generator: torch.Generator, offset: float = 0.0):
    """Gaussian noise and the objective's timesteps (`draw_noise` without the input noise)."""
    noise, t, _ = draw_noise(latents, objective, generator, offset)
    return noise, t


def take_drawn(objective) -> torch.Tensor | None:
    """The timesteps (σ for rectified flow) drawn since the last call, on the CPU; None if none."""
    drawn, objective.drawn = objective.drawn, []
    return torch.cat(drawn).float() if drawn else None


def per_sample_loss(denoiser, objective, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor, added_cond: dict | None = None, *, input_noise: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None, opts: L.LossOptions = L.L2) -> torch.Tensor:
    """The loss (`opts`: MSE unless told) between the denoiser's prediction and the objective's target, one value
    per sample. `input_noise`: the noise the model's input is made with where it is not the target's
    (--ip-noise-gamma); `weight`: a per-element weight of the loss (a mask), broadcast to the prediction."""
    noisy = objective.noisy(latents, noise if input_noise is None else input_noise, timesteps)
    pred = objective.predict(denoiser, noisy, timesteps, cond, added_cond)
    target = objective.target(latents, noise, timesteps)
    return L.per_sample(pred, target, opts, objective, timesteps, weight)


@dataclass
class Batch:
    """One forward of the denoiser: scaled latents of instance examples first, then class examples (prior
    preservation), with their conditioning, noise and timesteps."""

    latents: torch.Tensor
    cond: torch.Tensor  # text hidden states
    added_cond: dict | None  # SDXL's pooled text and size/crop numbers; SD3/FLUX's pooled text ("pooled")
    noise: torch.Tensor
    timesteps: torch.Tensor
    n_instance: int  # rows [0, n_instance) are instance examples, the rest class examples
    input_noise: torch.Tensor | None = None  # the model input's noise where it is not `noise` (--ip-noise-gamma)
    mask: torch.Tensor | None = None  # loss masks [B, 1, h, w] (--masks/--alpha-mask), None: learn everywhere


def batch_loss(denoiser, objective, batches: list[Batch], prior_weight: float = 1.0,
               min_snr_gamma: float | None = None) -> torch.Tensor:
    """The training loss of one micro-step: per forward, the mean loss of its instance examples plus
    `prior_weight` times the mean loss of its class examples, each sample weighted by min-SNR-γ if set and by
    the debiased-estimation weight if the objective's loss options say so (--loss, --debiased-estimation)."""
    loss = torch.zeros((), device=batches[0].latents.device)
    for b in batches:
        losses = per_sample_loss(denoiser, objective, b.latents, b.cond, b.noise, b.timesteps, b.added_cond,
                                 input_noise=b.input_noise, weight=b.mask, opts=objective.loss)
        if min_snr_gamma:
            losses = losses * objective.min_snr_weights(b.timesteps, min_snr_gamma).to(losses.device)
        if objective.loss.debiased:
            losses = losses * L.debiased_weights(objective, b.timesteps).to(losses.device)
        if b.n_instance:
            loss = loss + losses[:b.n_instance].mean()
        if b.n_instance < len(losses):
            loss = loss + prior_weight * losses[b.n_instance:].mean()
    return loss


@torch.no_grad()
def fixed_loss(denoiser, objective, latents: torch.Tensor, cond: torch.Tensor, added_cond: dict | None = None,
               timesteps=(100, 300, 500, 700, 900), seed: int = 1234, mask: torch.Tensor | None = None) -> float:
    """Loss on fixed latents, noise and timesteps: comparable across a run, unlike the noisy training loss."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        ts = objective.fixed_timesteps(t, latents.shape[0], latents.device)
        total += per_sample_loss(denoiser, objective, latents, cond, noise, ts, added_cond, weight=mask).mean().item()
    return total / len(timesteps)
