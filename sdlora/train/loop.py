"""DreamBooth-LoRA training on accelerate, readable top to bottom: setup, loop, save."""

from __future__ import annotations

from dataclasses import dataclass
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdlora import adapter
from sdlora.config import TrainConfig
from sdlora.data import DreamBoothDataset, checked_images
from sdlora.errors import SdloraError
from sdlora.formats import meta
from sdlora.lora.inject import add_lora, format_table, report
from sdlora.lora.targets import PRESETS, find_targets
from sdlora.models import BASE_MODEL_VERSION, load_base
from sdlora.train import step as S

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    path: Path  # the adapter file written
    base: object  # the BaseModel, its UNet/text encoder still carrying the trained (unmerged) LoRA layers
    steps: int
    seconds: float  # wall time of the training steps alone
    loss_before: float  # loss on fixed noise and timesteps, before and after training
    loss_after: float


def _collate(items: list[dict]) -> dict:
    out = {"pixels": torch.stack([i["pixels"] for i in items]), "prompts": [i["prompt"] for i in items]}
    if "class_pixels" in items[0]:
        out["class_pixels"] = torch.stack([i["class_pixels"] for i in items])
        out["class_prompts"] = [i["class_prompt"] for i in items]
    return out


def _batches(loader):
    while True:  # epochs until the step budget is spent
        yield from loader


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Train a LoRA as `cfg` says and write it to `cfg.output_path`."""
    try:
        return _train(cfg, log)
    finally:
        # accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with other
        # settings (e.g. bf16 after fp32). A single-process caller (tests, the app) may train again with other
        # settings, so the state is reset; a launched multi-process run ends with this call anyway.
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state.get("num_processes", 1) == 1:
            AcceleratorState._reset_state(reset_partial_state=True)


def _train(cfg: TrainConfig, log) -> TrainResult:
    started = datetime.now(timezone.utc)
    out_path = cfg.output_path
    # Check the data before anything heavy loads: a bad file must not cost a model load.
    instance_images = checked_images(Path(cfg.images), "--images", cfg.skip_bad_images)
    class_images = checked_images(Path(cfg.class_images), "--class-images", cfg.skip_bad_images) if cfg.class_images else None

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SdloraError("--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no")
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)
    set_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG

    base = load_base(cfg.model)
    resolution = cfg.resolution or base.native_resolution
    weight_dtype = DTYPES[cfg.mixed_precision]
    unet, te, vae = base.unet, base.text_encoder, base.vae
    for m in (unet, te, vae):
        m.requires_grad_(False)

    train_te = not cfg.no_text_encoder
    targets = {"unet": find_targets(unet, "unet", cfg.preset)}
    add_lora(unet, targets["unet"], cfg.rank, cfg.network_alpha)
    if train_te:
        targets["te"] = find_targets(te, "te", cfg.preset)
        add_lora(te, targets["te"], cfg.rank, cfg.network_alpha)
    reports = [report(unet, "unet")] + ([report(te, "te")] if train_te else [])
    say(f"model {base.name} ({base.arch}, {base.prediction_type}); preset '{cfg.preset}', rank {cfg.rank}, "
        f"alpha {cfg.network_alpha:g} (scale {cfg.network_alpha / cfg.rank:g})")
    say(format_table(reports))

    # Frozen weights in the compute dtype, LoRA weights in fp32 (stable updates under fp16/bf16).
    # The VAE stays fp32: it only encodes, and fp16 VAEs are the usual source of NaN latents.
    for m in (unet, te):
        m.to(accelerator.device)
        for name, p in m.named_parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
    vae.to(accelerator.device)
    if vae.dtype != torch.float32:
        vae.to(torch.float32)

    dataset = DreamBoothDataset(instance_images, cfg.prompt, resolution, class_images, cfg.class_prompt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    say(f"{len(instance_images)} instance images" + (f", {len(class_images)} class images" if class_images else "")
        + f" at {resolution}px; {cfg.steps} steps × {cfg.grad_accum} accumulation × batch {cfg.batch_size} "
        f"= {cfg.steps * cfg.grad_accum * cfg.batch_size / len(dataset):.1f} epochs of {len(dataset)} images")

    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    if train_te:
        params.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.te_lr or cfg.lr})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler once per process, so its horizon is scaled the same way.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if train_te:  # a module without trainable parameters must not be wrapped for DDP
        te = accelerator.prepare(te)

    # With a frozen text encoder the prompts never change: encode them once.
    cache: dict[str, torch.Tensor] = {}

    def cond(prompts: list[str]) -> torch.Tensor:
        if train_te:
            return S.encode_prompts(base.tokenizer, te, prompts)
        missing = [p for p in set(prompts) if p not in cache]
        if missing:
            with torch.no_grad():
                for p, e in zip(missing, S.encode_prompts(base.tokenizer, te, missing)):
                    cache[p] = e
        return torch.stack([cache[p] for p in prompts])

    g = torch.Generator().manual_seed(cfg.seed + 1 + accelerator.process_index)
    eval_pixels = torch.stack(dataset.instance[:4]).to(accelerator.device)

    def eval_loss() -> float:
        with torch.no_grad(), accelerator.autocast():
            c = cond([cfg.prompt] * len(eval_pixels))
            return S.fixed_loss(unet, vae, base.noise_scheduler, base.prediction_type, eval_pixels, c)

    loss_before = eval_loss()
    unet.train()
    te.train(train_te)
    batches = _batches(loader)
    done, t0 = 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="training", unit="step", disable=not main, dynamic_ncols=True)
    ema = None
    try:
        while done < cfg.steps:
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                with accelerator.accumulate(unet, te), accelerator.autocast():
                    pixels, prompts = batch["pixels"], batch["prompts"]
                    n_inst = pixels.shape[0]
                    if "class_pixels" in batch:
                        pixels = torch.cat([pixels, batch["class_pixels"]])
                        prompts = prompts + batch["class_prompts"]
                    if not cfg.no_flip:
                        flip = torch.rand(pixels.shape[0], generator=g) < 0.5
                        pixels = torch.where(flip[:, None, None, None].to(pixels.device), pixels.flip(-1), pixels)
                    with torch.no_grad():
                        latents = S.encode_images(vae, pixels, g)
                    noise, t = S.sample_noise(latents, base.noise_scheduler.config.num_train_timesteps, g)
                    losses = S.per_sample_loss(unet, base.noise_scheduler, base.prediction_type, latents,
                                               cond(prompts), noise, t)
                    loss = losses[:n_inst].mean()
                    if n_inst < losses.shape[0]:
                        loss = loss + cfg.prior_loss_weight * losses[n_inst:].mean()
                    if not torch.isfinite(loss):
                        raise SdloraError(f"loss became {loss.item()} at step {done + 1}; nothing was saved. "
                                          "Lower --lr, or use --mixed-precision bf16/no instead of fp16")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for grp in params for p in grp["params"]], cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            done += 1
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        if done == 0:
            say("interrupted before the first step; nothing saved")
            raise
        say(f"interrupted: saving the {done} steps trained so far")
        _save(cfg, base, accelerator, targets, resolution, done, len(instance_images), class_images, started, out_path, say)
        raise
    bar.close()
    elapsed = time.perf_counter() - t0
    unet.eval()
    te.eval()
    loss_after = eval_loss()
    say(f"{done} steps in {elapsed:.1f}s ({elapsed / max(done, 1):.3f} s/step); "
        f"loss on fixed noise {loss_before:.4f} -> {loss_after:.4f}")
    path = _save(cfg, base, accelerator, targets, resolution, done, len(instance_images), class_images, started,
                 out_path, say)
    return TrainResult(path, base, done, elapsed, loss_before, loss_after)


def _save(cfg, base, accelerator, targets, resolution, steps, n_images, class_images, started, out_path, say) -> Path:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out_path
    comps = {"unet": accelerator.unwrap_model(base.unet)}
    if "te" in targets:
        comps["te"] = accelerator.unwrap_model(base.text_encoder)
    tensors = adapter.kohya_tensors(comps, adapter.SAVE_DTYPES[cfg.save_precision])
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise SdloraError("the adapter holds NaN/Inf values; nothing was saved. Lower --lr or use bf16/no precision")
    md = meta.build(
        arch=base.arch, base_model_version=BASE_MODEL_VERSION[base.arch], model_name=base.name,
        output_name=out_path.stem, rank=cfg.rank, alpha=cfg.network_alpha, preset=cfg.preset,
        targets={c: PRESETS[cfg.preset][c][0] for c in targets}, resolution=resolution, steps=steps,
        num_images=n_images, num_reg_images=len(class_images or []), trigger=cfg.prompt,
        tag_frequency={Path(cfg.images).name: dict(Counter({cfg.prompt: n_images}))},
        lr=cfg.lr, te_lr=(cfg.te_lr or cfg.lr) if "te" in targets else None, seed=cfg.seed,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        prior_loss_weight=cfg.prior_loss_weight if cfg.class_prompt else None, started=started)
    path = adapter.save(tensors, out_path, md)
    n_modules = len(tensors) // 3
    say(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, {n_modules} modules, {len(tensors)} tensors)")
    return path
