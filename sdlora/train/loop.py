"""DreamBooth-LoRA training on accelerate, readable top to bottom: data, model, caches, loop, save."""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdlora import outputs
from sdlora.cache import EmbeddingCache, LatentCache, default_cache_dir
from sdlora.config import TrainConfig
from sdlora.data import (Example, PromptRules, build_examples, checked_images, display_name, epoch_batches,
                         make_buckets, tag_frequency)
from sdlora.errors import SdloraError
from sdlora.formats import kohya, meta
from sdlora.formats.read import parse
from sdlora.formats.verify import verify
from sdlora.lora.inject import add_lora, collect, format_table, report
from sdlora.lora.targets import PRESETS, check_rank, find_targets, preset_component
from sdlora.train import SAVE_DTYPES
from sdlora.models import load_base
from sdlora.train import ckpt
from sdlora.train import step as S
from sdlora.train.monitor import Monitor, default_sample_prompts
from sdlora.train.prior import ensure_class_images

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    path: Path  # the adapter file written
    base: object  # the BaseModel, its UNet/text encoder still carrying the trained (unmerged) LoRA layers
    steps: int
    seconds: float  # wall time of the training steps alone
    loss_before: float  # loss on fixed noise and timesteps, before and after training
    loss_after: float
    loss_curve: Path | None = None
    samples: list[Path] | None = None


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


class _Schedule:
    """Which examples each micro-step trains on: deterministic in (seed, epoch), so a resumed run replays it."""

    def __init__(self, instance: list[Example], classes: list[Example], cfg: TrainConfig, rank: int, world: int,
                 position: dict | None = None):
        self.instance, self.classes, self.cfg, self.rank, self.world = instance, classes, cfg, rank, world
        pos = position or {"epoch": 0, "batch": 0, "micro": 0}
        self.epoch, self.batch, self.micro = pos["epoch"], pos["batch"], pos["micro"]
        self.class_order = list(range(len(classes)))
        random.Random(cfg.seed + 17).shuffle(self.class_order)
        self._batches = None

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0)) // self.world

    def _epoch(self, epoch: int) -> list[list[int]]:
        b = epoch_batches(self.instance, self.cfg.batch_size, self.cfg.repeats, epoch, self.cfg.seed)
        b += b[: (-len(b)) % self.world]  # every process gets the same number of batches
        return b

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "micro": self.micro}

    def next(self) -> tuple[list[Example], list[Example]]:
        if self._batches is None:
            self._batches = self._epoch(self.epoch)
        if self.batch * self.world >= len(self._batches):
            self.epoch, self.batch = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        idx = self._batches[self.batch * self.world + self.rank]
        self.batch += 1
        inst = [self.instance[i] for i in idx]
        cls = []
        if self.classes:
            start = (self.micro * self.world + self.rank) * len(idx)
            cls = [self.classes[self.class_order[(start + j) % len(self.classes)]] for j in range(len(idx))]
        self.micro += 1
        return inst, cls


def _train(cfg: TrainConfig, log) -> TrainResult:
    started = datetime.now(timezone.utc)
    out_path = cfg.output_path
    plan = outputs.check_paths(cfg)  # outputs writable and harmless before anything loads (sdlora/outputs.py)
    # ---- 1. data, checked before anything heavy loads: a bad file must not cost a model load
    instance_images = checked_images(Path(cfg.images), "--images", cfg.skip_bad_images)
    class_folder = cfg.class_folder
    class_images = (checked_images(class_folder, "--class-images", cfg.skip_bad_images, allow_empty=True)
                    if class_folder and class_folder.is_dir() else [])
    if cfg.class_prompt and not class_images and cfg.num_class_images == 0:
        raise SdloraError(f"no class images in {class_folder}; add some, or pass --num-class-images N to generate them")

    # No DDP buffer broadcast: the only buffers are frozen (CLIP's position ids), and with buckets + prior
    # preservation processes may run different numbers of forwards per step, which per-forward broadcasts deadlock.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SdloraError("--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no")
    main = accelerator.is_main_process
    say = log if main else (lambda *a, **k: None)
    if main:
        outputs.remove_stale_temps(plan, say)
    set_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG

    # ---- 2. model
    base = load_base(cfg.model, prediction_type=cfg.prediction_type)
    resolution = cfg.resolution or base.native_resolution
    unet, vae = base.unet, base.vae
    tes = {c: te for c, (_, te) in base.text_encoders.items()}  # "te", or "te1" + "te2" for SDXL
    for m in (unet, vae, *tes.values()):
        m.requires_grad_(False)
        m.to(accelerator.device)
    if vae.dtype != torch.float32:  # the VAE only encodes; fp16 VAEs are the usual source of NaN latents
        vae.to(torch.float32)

    # ---- 3. class images for prior preservation, generated by the base model before any LoRA exists
    if cfg.class_prompt and len(class_images) < cfg.num_class_images:
        if main:
            with accelerator.autocast():
                ensure_class_images(base, cfg.class_prompt, class_folder, cfg.num_class_images, resolution,
                                    seed=cfg.seed, log=say)
        accelerator.wait_for_everyone()
        class_images = checked_images(class_folder, "--class-images", cfg.skip_bad_images)

    # ---- 4. examples: captions, sizes, and the step arithmetic
    rules = PromptRules(cfg.prompt, cfg.trigger_text, cfg.shuffle_tags, cfg.keep_tags, cfg.caption_dropout)
    bucket_list = make_buckets(resolution, max(8, resolution // 8)) if cfg.buckets else None
    instance = build_examples(instance_images, rules, resolution, bucket_list)
    classes = build_examples(class_images, rules, resolution, bucket_list, fixed_caption=cfg.class_prompt, is_class=True)
    schedule = _Schedule(instance, classes, cfg, accelerator.process_index, accelerator.num_processes)
    per_epoch = schedule.batches_per_epoch()
    steps = math.ceil(per_epoch * cfg.epochs / cfg.grad_accum) if cfg.epochs else cfg.steps
    n_captioned = sum(e.has_caption for e in instance)
    prng = random.Random(cfg.seed + 3)
    say(f"data: {len(instance)} instance images ({n_captioned} with caption files)"
        + (f", {len(classes)} class images ('{cfg.class_prompt}', loss weight {cfg.prior_loss_weight})" if classes else "")
        + (f", {len(set(e.size for e in instance))} aspect buckets" if bucket_list else f", {resolution}px"))
    for ex in instance[:3]:
        say(f"  e.g. {display_name(ex.path)}: '{rules.final(ex.caption, random.Random(0))}'")
    say(f"steps: {len(instance)} images × {cfg.repeats} repeats / batch {cfg.batch_size}"
        + (f" / {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "")
        + f" = {per_epoch} batches per epoch; {steps} steps × {cfg.grad_accum} accumulation = "
        f"{steps * cfg.grad_accum / per_epoch:.1f} epochs")

    # ---- 5. LoRA
    train_te = not cfg.no_text_encoder
    adapted = {"unet": unet} | (tes if train_te else {})
    targets = {c: find_targets(m, c, cfg.preset) for c, m in adapted.items()}
    check_rank(adapted, targets, cfg.rank, base.name)
    for c, m in adapted.items():
        add_lora(m, targets[c], cfg.rank, cfg.network_alpha)
    if main:  # estimated bytes written vs free space, before latents are cached and steps run
        outputs.check_space(outputs.estimate_for_run(cfg, plan, adapted, instance + classes, steps, resolution))
    say(f"model {base.name} ({base.arch}, {base.prediction_type}); preset '{cfg.preset}', rank {cfg.rank}, "
        f"alpha {cfg.network_alpha:g} (scale {cfg.network_alpha / cfg.rank:g})")
    say(format_table([report(m, c) for c, m in adapted.items()]))
    # Frozen weights in the compute dtype, LoRA weights in fp32 (stable updates under fp16/bf16).
    weight_dtype = DTYPES[cfg.mixed_precision]
    for m in (unet, *tes.values()):
        for p in m.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for c, m in adapted.items():
            if c != "unet":
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- 6. caches: latents always (memory, and disk unless --no-cache); prompts when the text encoder is frozen
    cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    latents_cache = LatentCache(vae, cache_dir)
    text_cache = None if train_te else EmbeddingCache(list(base.text_encoders.values()), base.spec, cache_dir)
    flips = (False,) if cfg.no_flip else (False, True)
    if main:
        for ex in tqdm(instance + classes, desc="caching latents", unit="img", leave=False):
            for f in flips:
                latents_cache.get(ex, f)
        st = latents_cache.store
        say(f"latents: {st.hits} from cache, {st.misses} encoded" + (f" ({cache_dir})" if cache_dir else ""))
    accelerator.wait_for_everyone()

    # ---- 7. optimizer, schedule, accelerate
    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    if train_te:
        params.append({"params": [p for m in tes.values() for p in m.parameters() if p.requires_grad],
                       "lr": cfg.te_lr or cfg.lr})
    trainable = [p for g in params for p in g["params"]]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler once per process, so its horizon is scaled the same way.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=steps * accelerator.num_processes)
    unet_p, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # a module without trainable parameters must not be DDP-wrapped
    tes_p = {c: accelerator.prepare(m) if train_te else m for c, m in tes.items()}
    text_encoders_p = [(tok, tes_p[c]) for c, (tok, _) in base.text_encoders.items()]

    # ---- 8. resume
    identity = {k: getattr(cfg, k) for k in ckpt.IDENTITY} | {"processes": accelerator.num_processes}
    data_ids = {str(e.path.resolve()): latents_cache.digest(e.path) for e in instance + classes}
    ckpt_root = ckpt.checkpoint_root(out_path)
    g = torch.Generator().manual_seed(cfg.seed + 1 + accelerator.process_index)
    done = 0
    if cfg.resume:
        folder = ckpt.resolve(cfg.resume, ckpt_root)
        manifest, tensors = ckpt.load(folder, identity, data_ids)
        ckpt.check_params(folder, tensors, _lora_params(adapted))
        for n, p in _lora_params(adapted).items():
            p.data.copy_(tensors[f"lora/{n}"])
        ckpt.restore_optimizer(optimizer, manifest, tensors)
        lr_scheduler.load_state_dict(manifest["lr_scheduler"])
        g.set_state(tensors["rng/train"])
        torch.set_rng_state(tensors["rng/torch"])
        prng.setstate(_tuples(manifest["python_rng"]))
        schedule = _Schedule(instance, classes, cfg, accelerator.process_index, accelerator.num_processes,
                             manifest["position"])
        done = manifest["step"]
        say(f"resumed from {folder} at step {done}")
        if done >= steps:
            raise SdloraError(f"{folder} is at step {done}, the run has {steps} steps: pass a larger --steps to go on")
    start_step = done  # the summary counts the steps run in this process

    def cond(examples: list[Example], prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        """UNet conditioning: text hidden states, and SDXL's pooled text + size/crop micro-conditioning."""
        if text_cache is not None:
            hidden, pooled = text_cache.get(prompts)
            hidden = hidden.to(accelerator.device, weight_dtype)
            pooled = pooled.to(accelerator.device, weight_dtype) if pooled is not None else None
        else:
            hidden, pooled = S.encode_text(base.spec, text_encoders_p, prompts)
        if not base.spec.micro_conditioning:
            return hidden, None
        return hidden, S.added_cond(pooled, torch.tensor([e.sdxl_time_ids() for e in examples]))

    def latents_of(examples: list[Example]) -> torch.Tensor:
        out = []
        for ex in examples:
            flip = bool(len(flips) == 2 and torch.rand((), generator=g) < 0.5)
            mean, std = latents_cache.get(ex, flip)
            out.append(mean + std * torch.randn(mean.shape, generator=g))
        return torch.stack(out).to(accelerator.device) * vae.config.scaling_factor

    eval_examples = instance[:4]

    def eval_loss() -> float:
        with torch.no_grad(), accelerator.autocast():
            total = 0.0
            for ex in eval_examples:
                lat = latents_cache.get(ex, False)[0][None].to(accelerator.device) * vae.config.scaling_factor
                total += S.fixed_loss(unet_p, base.noise_scheduler, base.prediction_type, lat, *cond([ex], [ex.caption]))
            return total / len(eval_examples)

    sample_prompts = ([p.strip() for p in cfg.sample_prompts.split(";") if p.strip()] if cfg.sample_prompts
                      else default_sample_prompts(cfg.prompt, cfg.class_prompt))
    monitor = Monitor(out_path, cfg.tensorboard) if main else None
    samples: list[Path] = []

    def save_adapter(path: Path, step: int, log_=say) -> Path:
        with outputs.finish_before_interrupt(say, f"adapter {path} ({step} steps)"):
            return _save(cfg, base, accelerator, targets, resolution, step, instance, classes, started, path, log_)

    def checkpoint(step: int) -> None:
        if not main:
            return
        with outputs.warn_on_disk_error(say, f"checkpoint at step {step}"), \
                outputs.finish_before_interrupt(say, f"checkpoint {ckpt_root / f'step-{step:06d}'}"):
            _checkpoint(step)

    def _checkpoint(step: int) -> None:
        folder = ckpt.save(ckpt_root / f"step-{step:06d}", step=step, identity=identity, data=data_ids,
                           position=schedule.position(), params=_lora_params(adapted), optimizer=optimizer,
                           lr_scheduler=lr_scheduler,
                           rng={"train": g.get_state(), "python": prng.getstate()},
                           adapter_writer=lambda p: save_adapter(p, step, lambda *a: None))
        ckpt.prune(ckpt_root, cfg.keep_last)
        say(f"checkpoint {folder}")

    def sample(step: int) -> None:
        if main:
            unet.eval()
            with accelerator.autocast(), outputs.warn_on_disk_error(say, f"sample grid at step {step}"):
                samples.append(monitor.samples(step, base, sample_prompts, resolution, cfg.sample_steps))
            unet.train()

    # ---- 9. the loop
    loss_before = eval_loss()
    unet_p.train()
    for m in tes_p.values():
        m.train(train_te)
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=done, desc="training", unit="step", disable=not main, dynamic_ncols=True)
    ema = None
    alphas_cumprod = base.noise_scheduler.alphas_cumprod
    # Ctrl-C finishes the step under way, so that what is saved (adapter and checkpoint) is a whole step and a
    # resume continues exactly; a second Ctrl-C stops at once.
    stop = _StopFlag(lambda: say("\nCtrl-C: finishing this step, then saving (press again to abort)"))
    try:
        while done < steps and not stop.set:
            for _ in range(cfg.grad_accum):
                inst, cls = schedule.next()
                with accelerator.accumulate(unet_p, *tes_p.values()), accelerator.autocast():
                    # instance and class examples train together when they have the same size (always, unless
                    # buckets put them apart); the prior loss is their class part
                    groups = [(inst, 1.0)] + ([(cls, cfg.prior_loss_weight)] if cls else [])
                    if cls and inst[0].size == cls[0].size:
                        groups = [(inst + cls, None)]
                    loss = torch.zeros((), device=accelerator.device)
                    for examples, weight in groups:
                        latents = latents_of(examples)
                        noise, t = S.sample_noise(latents, base.noise_scheduler.config.num_train_timesteps, g,
                                                  cfg.noise_offset)
                        prompts = [rules.final(e.caption, prng) if not e.is_class else e.caption for e in examples]
                        hidden, added = cond(examples, prompts)
                        losses = S.per_sample_loss(unet_p, base.noise_scheduler, base.prediction_type, latents,
                                                   hidden, noise, t, added)
                        if cfg.min_snr_gamma:
                            losses = losses * S.min_snr_weights(alphas_cumprod, t, cfg.min_snr_gamma,
                                                                base.prediction_type).to(losses.device)
                        if weight is None:  # one combined forward
                            n = len(inst)
                            loss = loss + losses[:n].mean() + cfg.prior_loss_weight * losses[n:].mean()
                        else:
                            loss = loss + weight * losses.mean()
                    if not torch.isfinite(loss):
                        raise SdloraError(f"loss became {loss.item()} at step {done + 1}; the adapter was not saved. "
                                          "Lower --lr, or use --mixed-precision bf16/no instead of fp16")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            done += 1
            lv = loss.item()
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            lr_now = lr_scheduler.get_last_lr()[0]
            if monitor:
                monitor.step(done, lv, lr_now)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_now:.2e}", refresh=False)
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                checkpoint(done)
            if cfg.sample_every and done % cfg.sample_every == 0:
                sample(done)
    except KeyboardInterrupt:
        bar.close()
        say("aborted in the middle of a step; nothing saved")
        raise
    finally:
        stop.restore()
    if stop.set:
        bar.close()
        if done == 0 or not main:
            say("interrupted before the first step; nothing saved")
            raise KeyboardInterrupt
        say(f"interrupted: saving the {done} steps trained so far")
        checkpoint(done)
        save_adapter(out_path, done)
        say("continue with: --resume latest (same settings)")
        if monitor:
            monitor.close()
        raise KeyboardInterrupt
    bar.close()
    elapsed = time.perf_counter() - t0
    unet_p.eval()
    for m in tes_p.values():
        m.eval()
    loss_after = eval_loss()
    ran = done - start_step
    say(f"{ran} steps in {elapsed:.1f}s ({elapsed / max(ran, 1):.3f} s/step)"
        + (f", steps {start_step + 1}-{done} after resuming" if start_step else "") + "; "
        f"loss on fixed noise {loss_before:.4f} -> {loss_after:.4f}")
    if cfg.sample_every and (not samples or not samples[-1].stem.endswith(f"{done:06d}")):
        sample(done)
    curve = None
    if monitor:
        with outputs.warn_on_disk_error(say, "loss curve"):
            curve = monitor.close()
    if curve:
        say(f"loss curve {curve}" + (f"; samples in {samples[-1].parent}" if samples else ""))
    accelerator.wait_for_everyone()
    path = save_adapter(out_path, done)
    return TrainResult(path, base, done, elapsed, loss_before, loss_after, curve, samples)


class _StopFlag:
    """SIGINT sets a flag (the loop stops at the next step boundary); a second SIGINT raises KeyboardInterrupt.
    Only in the main thread (signal handlers cannot be set elsewhere, e.g. inside the app's worker threads)."""

    def __init__(self, notice):
        self.set = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._notice = notice

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self._notice()

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _lora_params(adapted: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{c}/{n}": p for c, m in adapted.items() for n, p in m.named_parameters() if p.requires_grad}


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def _save(cfg, base, accelerator, targets, resolution, steps, instance, classes, started, out_path, say) -> Path:
    """Write the adapter (main process only; callers synchronise processes first)."""
    if not accelerator.is_main_process:
        return out_path
    tensors = _adapter_tensors(base, accelerator, targets, SAVE_DTYPES[cfg.save_precision])
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise SdloraError("the adapter holds NaN/Inf values; nothing was saved. Lower --lr or use bf16/no precision")
    md = meta.build(
        arch=base.arch, base_model_version=base.base_model_version, model_name=base.name,
        output_name=cfg.output_path.stem, rank=cfg.rank, alpha=cfg.network_alpha, preset=cfg.preset,
        targets={c: PRESETS[cfg.preset][preset_component(c)][0] for c in targets}, resolution=resolution, steps=steps,
        num_images=len(instance) * cfg.repeats, num_reg_images=len(classes), trigger=cfg.trigger_text,
        tag_frequency={Path(cfg.images).name: tag_frequency([e.caption for e in instance])},
        lr=cfg.lr, te_lr=(cfg.te_lr or cfg.lr) if len(targets) > 1 else None, seed=cfg.seed,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, mixed_precision=cfg.mixed_precision,
        lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        prior_loss_weight=cfg.prior_loss_weight if classes else None, started=started)
    md["ss_min_snr_gamma"] = str(cfg.min_snr_gamma)
    md["ss_noise_offset"] = str(cfg.noise_offset)
    md["ss_enable_bucket"] = str(cfg.buckets)
    md["sdlora_config"] = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("resume",)}, default=str)
    # Check the file as ComfyUI, A1111, kohya and diffusers will read it. It is written either way (a failed check
    # must not lose the training), but a problem fails the run loudly.
    report_ = verify(parse(tensors, md, where=str(out_path)), model=base, path=str(out_path))
    if out_path == cfg.output_path:  # the run's result: a full disk saves it elsewhere rather than losing it
        path = outputs.save_or_rescue(lambda p: kohya.save(tensors, p, md), out_path)
    else:  # inside a checkpoint folder: its writer handles failures
        path = kohya.save(tensors, out_path, md)
    say(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, {len(tensors) // 3} modules, {len(tensors)} tensors)")
    for line in report_.lines()[1:-1]:
        say(line)
    if not report_.ok:
        raise SdloraError(f"{path} was saved but does not verify: {report_.problems[0]} (run `sdlora verify {path}`)")
    return path


def _adapter_tensors(base, accelerator, targets, dtype) -> dict[str, torch.Tensor]:
    """The kohya tensors of the trained LoRA layers, cast to `dtype`."""
    layers = {c: collect(accelerator.unwrap_model(m)) for c, m in base.components.items() if c in targets}
    return kohya.to_tensors(kohya.from_layers(layers, base.arch), dtype)
