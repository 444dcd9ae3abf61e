"""Pretrain the toy base model from nothing: VAE, then text encoder + UNet, on renders of the toy world.

    python -m sdlora.toy pretrain --out sdlora/toy/base

Runs on one CPU thread (the default here, so a shared machine stays usable) and is deterministic: the same
command on the same torch version writes the same weights. Seeds below 10,000,000 are pretraining data;
the judge and tests use seeds from 10,000,000 up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.toy import arch, world
from sdlora.train.step import DiffusionObjective, per_sample_loss, sample_noise


def _to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_batch(seeds, combos=world.SEEN_COMBOS) -> tuple[torch.Tensor, list[world.Scene]]:
    scenes = [world.sample_scene(int(s), combos) for s in seeds]
    return _to_tensor(np.stack([world.render(s) for s in scenes])), scenes


def train_vae(steps: int, batch: int, lr: float, log, seed_base: int = 5_000_000):
    """AutoencoderKL (factor 4: 32 px -> 4×8×8 latents) on fresh renders of seen scenes; MSE + L1 + tiny KL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(arch.vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50) * (0.1 + 0.9 * (1 - i / steps)))
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    for i in range(steps):
        x, _ = render_batch(range(seed_base + i * batch, seed_base + (i + 1) * batch))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (i + 1) % 100 == 0 or i == 0:
            log(f"vae {i + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, chunk: int = 256):
    """Latent means (unscaled) and scenes of pretraining seeds 0..n-1."""
    lat, scenes = [], []
    for s in range(0, n, chunk):
        x, sc = render_batch(range(s, min(n, s + chunk)))
        lat.append(vae.encode(x).latent_dist.mean)
        scenes += sc
    return torch.cat(lat), scenes


def train_denoiser(latents: torch.Tensor, scenes, tokenizer, steps: int, batch: int, lr: float, log,
                   ema_decay: float = 0.999):
    """Text encoder and UNet from scratch on the epsilon objective (SD 1.5's schedule), with min-SNR-5
    loss weighting and an EMA of the weights (the EMA is what is saved); one step is the same math as a LoRA
    training step (`sdlora.train.step`).

    The EMA is diffusers' `EMAModel` with its default warmup: decay min(`ema_decay`, (1+n)/(10+n)) at update n,
    and 0 at the first update (the average starts from the weights after the first step). The shipped toy base
    was pretrained with a hand-written EMA that used decay 0.1 at that first update instead: its average kept
    10% of the random initial weights, times the later decays (a weight below 1e-5 after ten updates, 1e-7 after
    twenty). A rerun therefore gives slightly different bits (also from rounding: diffusers subtracts
    (1-d)(ema-p) where the hand-written code used lerp, and min-SNR now comes from diffusers' `compute_snr`),
    not a different model."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(arch.unet_config())
    te = CLIPTextModel(CLIPTextConfig(**arch.text_encoder_config(tokenizer)))
    objective = DiffusionObjective(DDPMScheduler.from_config(arch.load_config("sd15", "scheduler")))
    params = list(unet.parameters()) + list(te.parameters())
    ema = EMAModel(params, decay=ema_decay, foreach=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warm = 100
    lrs = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (1.0 if i < 0.7 * steps else max(0.05, (steps - i) / (0.3 * steps))))
    rng = np.random.default_rng(4)
    g = torch.Generator().manual_seed(5)
    caption_cache: dict[str, torch.Tensor] = {}

    def ids(captions):
        for c in captions:
            if c not in caption_cache:
                caption_cache[c] = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length,
                                             truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([caption_cache[c] for c in captions])

    t0 = time.perf_counter()
    avg = None
    for i in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(scenes), batch))
        x0 = latents[idx]
        caps = [world.training_caption(scenes[j], rng) for j in idx.tolist()]
        noise, t = sample_noise(x0, objective, g)
        per = per_sample_loss(unet, objective, x0, te(ids(caps))[0], noise, t)
        loss = (per * objective.min_snr_weights(t, 5.0)).mean()  # min-SNR-5
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lrs.step()
        ema.step(params)
        avg = per.mean().item() if avg is None else 0.98 * avg + 0.02 * per.mean().item()
        if (i + 1) % 100 == 0 or i == 0:
            log(f"unet {i + 1}/{steps} loss {avg:.4f} lr {lrs.get_last_lr()[0]:.1e} ({time.perf_counter() - t0:.0f}s)")
    ema.copy_to(params)
    return unet.eval(), te.eval()


def save_base(out: Path, vae, unet, te, tokenizer, info: dict) -> None:
    """Write a diffusers StableDiffusionPipeline folder (safetensors weights, no pickles)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config(arch.load_config("sd15", "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from sdlora.formats.file_io import atomic_write_dir

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "toy_pretrain.json").write_text(json.dumps(info, indent=2) + "\n")

    atomic_write_dir(Path(out), fill)


def pretrain(out: Path, vae_steps: int = 1200, vae_batch: int = 32, unet_steps: int = 2000, unet_batch: int = 64,
             n_latents: int = 20000, lr: float = 1e-3, log=print) -> dict:
    """Train the whole toy base and write it to `out`. Returns timings and settings."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    tokenizer = arch.build_tokenizer()
    vae = train_vae(vae_steps, vae_batch, 2e-3, log)
    t_vae = time.perf_counter() - t0
    latents, scenes = encode_dataset(vae, n_latents)
    std = latents.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    latents = latents / std
    log(f"latents {tuple(latents.shape)}, scaling_factor {vae.config.scaling_factor}")
    t_enc = time.perf_counter() - t0 - t_vae
    unet, te = train_denoiser(latents, scenes, tokenizer, unet_steps, unet_batch, lr, log)
    t_all = time.perf_counter() - t0
    info = {"vae_steps": vae_steps, "vae_batch": vae_batch, "unet_steps": unet_steps, "unet_batch": unet_batch,
            "n_latents": n_latents, "lr": lr, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "seconds": {"vae": round(t_vae), "encode": round(t_enc), "unet_te": round(t_all - t_vae - t_enc),
                        "total": round(t_all)}}
    save_base(Path(out), vae, unet, te, tokenizer, info)
    log(f"wrote {out} in {t_all / 60:.1f} min")
    return info
