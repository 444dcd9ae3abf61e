"""DreamBooth-LoRA training on accelerate, readable top to bottom. `train` calls the phases in order, each returning
the record the later ones use: the inputs checked, the accelerator, the model, class images and examples
(`prepare.py`); every prompt encoded first for a deferred denoiser and the caches (`caches.py`, which also decides
which frozen modules leave memory); the LoRA layers and the optimizer (`trainable.py`); the resume position (here).
Then `_Loop` runs the steps, checkpoints and samples as it goes, and writes the adapter (`export.py`). The loss of a
step is `step.batch_loss`; which examples a step sees is `data.Schedule`.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora import outputs
from sdlora.config import TrainConfig
from sdlora.data.examples import Example
from sdlora.errors import SdloraError
from sdlora.train import caches as C
from sdlora.train import ckpt, init_lora, memory, optim, prepare, scale, speed, trainable
from sdlora.train import step as S
from sdlora.train.controls import Controls
from sdlora.train.export import save_adapter
from sdlora.train.monitor import Monitor, sample_prompts
from sdlora.train.prepare import Env, Examples, Model, quiet

LOG_EVERY = 10  # steps between reads of the loss from the device (progress bar, loss curve, NaN check)


@dataclass
class TrainResult:
    path: Path  # the adapter file written
    model: object  # the BaseModel as training left it: see `base`
    steps: int
    seconds: float  # wall time of the training steps alone
    loss_before: float | None  # loss on fixed noise and timesteps, before and after training (None: --no-eval-loss)
    loss_after: float | None
    loss_curve: Path | None = None
    samples: list[Path] | None = None
    steady_seconds: float | None = None  # wall time of the steps after the first one (which pays for warm-up)
    restore: object = field(default=None, repr=False)  # gives released frozen modules their weights back
    swap_stats: list | None = None  # --blocks-to-swap: per swapped block, its forward/backward uses and copies

    @property
    def base(self):
        """The BaseModel whole, its UNet/text encoder still carrying the trained (unmerged) LoRA layers. Frozen
        modules that left memory once their outputs were cached (VAE, text encoders) are reloaded on first access,
        so a caller that only wanted the file (the CLI) never pays for them."""
        if self.restore is not None:
            self.restore()
            self.restore = None
        return self.model


def train(cfg: TrainConfig, log=print, base=None) -> TrainResult:
    """Train a LoRA as `cfg` says and write it to `cfg.output_path`. `base`: an already built BaseModel (from
    `models.from_components`) to train instead of loading `cfg.model`, e.g. benchmarks/gpu_check.py's random-weight
    SD 1.5/SDXL; it comes back carrying the LoRA layers."""
    try:
        return _train(cfg, log, base)
    finally:
        _reset_accelerate()


def _train(cfg: TrainConfig, log, given_base) -> TrainResult:
    started = datetime.now(timezone.utc)
    cfg, plan, dataset = prepare.check_inputs(cfg, log, given_base)  # before anything heavy loads
    with outputs.run_lock(plan, "--out" if cfg.out else "--output-dir/--name"):
        env = prepare.setup(cfg, plan, log)
        model = prepare.load_model(cfg, env, given_base)
        prepare.make_class_images(cfg, env, model, dataset)
        data = prepare.make_examples(cfg, env, model, dataset)
        text = C.encode_first(cfg, env, model, data) if model.base.deferred else None
        lora = trainable.add_lora_layers(cfg, env, model, data, plan)
        init_lora.apply(cfg, model, lora, env.say)  # --init-lora: the layers start from that adapter
        caches = C.fill(cfg, env, model, data, text)  # text caches made after LoRA unless encode_first made them
        opt = trainable.prepare_optimizer(cfg, env, model, lora, data.steps)
        pos = resume(cfg, env, data, caches, lora, opt)
        return _Loop(cfg, env, model, data, lora, caches, opt, pos, started).run()


def _reset_accelerate() -> None:
    """accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with other settings
    (e.g. bf16 after fp32). A single-process caller (tests, the app) may train again with other settings, so the
    state is reset; a launched multi-process run ends with this call anyway.

    accelerate has no public way to reset it: `AcceleratorState._reset_state` is what its own test base class
    (`accelerate.test_utils.AccelerateTestCase.tearDown`) calls between tests."""
    from accelerate.state import AcceleratorState, PartialState, is_initialized

    if not is_initialized() or PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


@dataclass
class Position:
    """Where the steps start (0, or a checkpoint's step), the random streams, and what a checkpoint records."""
    start_step: int
    schedule: object  # data.Schedule, at the checkpoint's position when resumed
    g: torch.Generator  # noise, timesteps, flips
    prng: random.Random  # caption shuffling and dropout
    identity: dict  # the settings a checkpoint must match to be resumed
    data_ids: dict  # image path -> sha256
    ckpt_root: Path
    extra: tuple | None = None  # a checkpoint's state of the training controls (controls.py): tensors, values


# ---- the resume position: a checkpoint's step, schedule, RNG, LoRA weights and optimizer state
def resume(cfg: TrainConfig, env: Env, data: Examples, caches: C.Caches, lora: trainable.Lora,
           opt: trainable.Optimizing) -> Position:
    acc = env.accelerator
    pos = Position(0, data.schedule, torch.Generator().manual_seed(cfg.seed + 1 + acc.process_index),
                   random.Random(cfg.seed + 3),
                   {k: getattr(cfg, k) for k in ckpt.IDENTITY} | {"processes": acc.num_processes},
                   {str(e.path.resolve()): caches.latent.digest(e.path) for e in data.instance + data.classes},
                   ckpt.checkpoint_root(cfg.output_path))
    if not cfg.resume:
        return pos
    folder = ckpt.resolve(cfg.resume, pos.ckpt_root)
    manifest = ckpt.restore(folder, pos.identity, pos.data_ids, params=_lora_params(lora.trained),
                            optimizer=opt.optimizer, lr_scheduler=opt.lr_scheduler,
                            rng={"train": pos.g, "python": pos.prng}, extra=lambda *te: setattr(pos, "extra", te))
    pos.schedule = prepare.new_schedule(cfg, env, data.instance, data.classes, manifest["position"])
    pos.start_step = manifest["step"]  # the summary counts the steps run in this process
    env.say(f"resumed from {folder} at step {pos.start_step}")
    if pos.start_step >= data.steps:
        raise SdloraError(f"{folder} is at step {pos.start_step}, the run has {data.steps} steps: "
                          "pass a larger --steps to go on")
    return pos


class _Loop:
    """The steps of a run, on what the phases built; its own state is the step count, the losses not yet read
    from the device, and the sample grids written."""

    def __init__(self, cfg: TrainConfig, env: Env, model: Model, data: Examples, lora: trainable.Lora,
                 caches: C.Caches, opt: trainable.Optimizing, pos: Position, started: datetime):
        self.cfg, self.env, self.model, self.data, self.lora = cfg, env, model, data, lora
        self.caches, self.opt, self.pos, self.started, self.say = caches, opt, pos, started, env.say
        self.done = pos.start_step
        self.ema, self.pending, self.samples = None, [], []
        self.monitor = Monitor(cfg.output_path, cfg.log_with, cfg.to_dict(), cfg.progress_file) if env.main else None
        self.sample_prompts = sample_prompts(cfg.sample_prompts, cfg.prompt, cfg.class_prompt)
        self.controls = Controls(self, _lora_params(lora.adapted))  # --ema, validation

    def run(self) -> TrainResult:
        cfg, say, steps, start = self.cfg, self.say, self.data.steps, self.pos.start_step
        self.controls.start(start)  # the validation loss before the first step
        loss_before = self.eval_loss()
        self.set_train(True)
        t0 = t_first = time.perf_counter()
        bar = tqdm(total=steps, initial=self.done, desc="training", unit="step", disable=not self.env.main,
                   dynamic_ncols=True)
        mark = _Marks() if self.env.main else quiet  # SDLORA_STEP_TIMES: step timestamps for bench_speed.py
        mark("start")
        if self.monitor:
            self.monitor.begin(steps, self.done)
        # Ctrl-C finishes the step under way, so that what is saved (adapter and checkpoint) is a whole step and a
        # resume continues exactly; a second Ctrl-C stops at once.
        stop = ckpt.StopFlag(lambda: say("\nCtrl-C: finishing this step, then saving (press again to abort)"))
        try:
            while self.done < steps and not stop.set:
                for _ in range(cfg.grad_accum):
                    loss = self.micro_step()
                self.done += 1
                self.controls.after_step(self.done, steps)
                self.pending.append((self.done, loss.detach(), self.opt.lr_scheduler.get_last_lr()[0]))
                mark(f"step {self.done} cached={len(self.caches.latent.store.memory)}")
                bar.update(1)
                saving = cfg.save_every and self.done % cfg.save_every == 0 and self.done < steps
                sampling = cfg.sample_every and self.done % cfg.sample_every == 0
                first = self.done == start + 1
                if first or saving or sampling or self.done % LOG_EVERY == 0 or self.done >= steps or stop.set:
                    self.read_losses(bar)
                if first:
                    t_first = time.perf_counter()
                if saving:
                    self.checkpoint()
                if sampling:
                    self.sample()
        except KeyboardInterrupt:
            bar.close()
            say("aborted in the middle of a step; nothing saved")
            raise
        except Exception as e:
            if cfg.compile and (err := speed.compile_error(e)):
                raise err from e
            raise
        finally:
            stop.restore()
        bar.close()
        if stop.set:
            self.save_interrupted()
        t_end = time.perf_counter()
        result = self.finish(loss_before, t_end - t0)
        result.steady_seconds = t_end - t_first if self.done > start + 1 else None
        result.swap_stats = [dict(c) for c in self.lora.swap.stats] if self.lora.swap else None
        return result

    def micro_step(self) -> torch.Tensor:
        """One forward and backward (the optimizer steps when gradient accumulation is complete). Nothing here
        waits for the device: the loss is read back by `read_losses`."""
        acc, opt, cfg = self.env.accelerator, self.opt, self.cfg
        inst, cls = self.pos.schedule.next()
        with acc.accumulate(opt.denoiser, *opt.tes.values()), acc.autocast():
            batches = [self.batch(examples) for examples in _forwards(inst, cls)]
            loss = S.batch_loss(opt.denoiser, self.model.objective, batches, cfg.prior_loss_weight, cfg.min_snr_gamma)
            acc.backward(loss)
            if self.env.fsdp and acc.sync_gradients:
                scale.average_gradients(opt.trainable)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(opt.trainable, cfg.max_grad_norm)
            opt.optimizer.step()
            opt.lr_scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
        return loss

    def batch(self, examples: list[Example]) -> S.Batch:
        """A forward's inputs: cached latents (flipped or not), noise and timesteps, the conditioning."""
        cfg, device, g, vae = self.cfg, self.env.device, self.pos.g, self.model.base.vae
        latents, masks = self.caches.latent.sample(examples, g, flips=not cfg.no_flip, with_masks=True)
        latents = S.scale_latents(vae.config, latents.to(device))
        noise, t, given = S.draw_noise(latents, self.model.objective, g, cfg.noise_offset)
        prompts = [e.caption if e.is_class else self.data.rules.final(e.caption, self.pos.prng) for e in examples]
        hidden, added = self.cond(examples, prompts)
        self.caches.release()  # before the forward: its activations come on top of what is still held
        return S.Batch(latents, hidden, added, noise, t, n_instance=sum(not e.is_class for e in examples),
                       input_noise=given, mask=masks)

    def cond(self, examples: list[Example], prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        """Denoiser conditioning: text hidden states, and SDXL's pooled text + size/crop micro-conditioning."""
        text, spec, device, dtype = self.caches.text, self.model.base.spec, self.env.device, self.env.weight_dtype
        if text.text is not None:
            hidden, pooled = text.text.get(prompts)
            hidden = hidden.to(device, dtype)
            pooled = pooled.to(device, dtype) if pooled is not None else None
        else:
            given = {c: tuple(None if x is None else x.to(device, dtype) for x in cache.get(prompts))
                     for c, cache in text.frozen.items()}
            hidden, pooled = S.encode_text(spec, self.opt.text_encoders, prompts, given)
        if spec.micro_conditioning:
            return hidden, S.added_cond(pooled, torch.tensor([e.sdxl_time_ids() for e in examples]))
        return hidden, ({"pooled": pooled} if pooled is not None else None)  # SD3/FLUX: pooled text only

    def eval_loss(self) -> float | None:
        """Mean loss of the first two instance examples on fixed noise at two timesteps (4 forwards: less than a
        few training steps); None with --no-eval-loss."""
        if self.cfg.no_eval_loss:
            return None
        examples, vae, device = self.data.instance[:2], self.model.base.vae, self.env.device
        with torch.no_grad(), self.env.accelerator.autocast(), optim.eval_weights(self.opt.optimizer):
            inputs = [(S.scale_latents(vae.config, self.caches.latent.get(ex, False)[0][None].to(device)),
                       self.cond([ex], [ex.caption])) for ex in examples]
            self.caches.release()  # before the forwards: a frozen text encoder may be done already
            total = sum(S.fixed_loss(self.opt.denoiser, self.model.objective, lat, *cond, timesteps=(300, 700))
                        for lat, cond in inputs)
            return total / len(examples)

    def read_losses(self, bar) -> None:
        """Bring the losses of the steps since the last call to the host (one device sync per LOG_EVERY steps, not
        one per step), log them, and stop on a NaN/Inf loss before anything is saved."""
        if not self.pending:
            return
        values = torch.stack([loss for _, loss, _ in self.pending]).float().cpu().tolist()
        for (step, _, lr), lv in zip(self.pending, values):
            if not math.isfinite(lv):
                raise SdloraError(f"loss became {lv} at step {step}; the adapter was not saved. "
                                  "Lower --lr, or use --mixed-precision bf16/no instead of fp16")
            self.ema = lv if self.ema is None else 0.9 * self.ema + 0.1 * lv
            if self.monitor:
                self.monitor.step(step, lv, lr)
        if self.monitor:  # a histogram of the σ (flow) or timesteps drawn since the last read
            self.monitor.timesteps(self.done, S.take_drawn(self.model.objective), self.model.objective.drawn_name)
        bar.set_postfix(loss=f"{self.ema:.4f}", lr=f"{self.pending[-1][2]:.2e}", refresh=False)
        self.pending = []

    def set_train(self, mode: bool) -> None:
        optim.set_mode(self.opt.optimizer, mode)  # schedule-free: training weights (y) vs evaluation weights (x)
        self.opt.denoiser.train(mode)
        for m in self.opt.tes.values():
            m.train(mode and m in self.lora.adapted.values())

    def checkpoint(self) -> None:
        if not self.env.main:
            return
        step, folder = self.done, self.pos.ckpt_root / f"step-{self.done:06d}"
        with outputs.warn_on_disk_error(self.say, f"checkpoint at step {step}"), \
                outputs.finish_before_interrupt(self.say, f"checkpoint {folder}"):
            opt, pos = self.opt, self.pos
            folder = ckpt.save(folder, step=step, identity=pos.identity, data=pos.data_ids,
                               position=pos.schedule.position(), params=_lora_params(self.lora.trained),
                               optimizer=opt.optimizer, lr_scheduler=opt.lr_scheduler,
                               rng={"train": pos.g.get_state(), "python": pos.prng.getstate()},
                               adapter_writer=self._checkpoint_adapter, extra=self.controls.state())
            ckpt.prune(pos.ckpt_root, self.cfg.keep_last)
            self.say(f"checkpoint {folder}")

    def _checkpoint_adapter(self, path: Path) -> None:
        with optim.eval_weights(self.opt.optimizer):
            self.save_adapter(path, quiet)

    def sample(self) -> None:
        if self.env.main:
            denoiser, model = self.model.base.denoiser, self.model
            denoiser.eval()
            with self.env.accelerator.autocast(), \
                    outputs.warn_on_disk_error(self.say, f"sample grid at step {self.done}"), \
                    optim.eval_weights(self.opt.optimizer), self.caches.whole():
                self.samples.append(self.monitor.samples(self.done, model.base, self.sample_prompts, model.resolution,
                                                         self.cfg.sample_steps))
            denoiser.train()

    def save_interrupted(self) -> None:
        """After a Ctrl-C at a step boundary: checkpoint and adapter of the steps done, then KeyboardInterrupt."""
        say = self.say
        if self.done == 0 or not self.env.main:
            say("interrupted before the first step; nothing saved")
            raise KeyboardInterrupt
        say(f"interrupted: saving the {self.done} steps trained so far")
        self.checkpoint()
        with optim.eval_weights(self.opt.optimizer):
            self.save_adapter(self.cfg.output_path)
        self.controls.finish(self.done, interrupted=True)  # the --ema file of the steps done
        say("continue with: --resume latest (same settings)")
        if self.monitor:
            self.monitor.close()
        raise KeyboardInterrupt

    def finish(self, loss_before: float, elapsed: float) -> TrainResult:
        cfg, say, done, start, device = self.cfg, self.say, self.done, self.pos.start_step, self.env.device
        self.controls.finish(done)  # the last validation, the --ema file
        self.set_train(False)
        loss_after = self.eval_loss()
        ran = done - start
        say(f"{ran} steps in {elapsed:.1f}s ({elapsed / max(ran, 1):.3f} s/step)"
            + (f", steps {start + 1}-{done} after resuming" if start else "")
            + (f"; loss on fixed noise {loss_before:.4f} -> {loss_after:.4f}" if loss_after is not None else ""))
        samples = self.samples
        if cfg.sample_every and (not samples or not samples[-1].stem.endswith(f"{done:06d}")):
            self.sample()
        curve = None
        if self.monitor:
            with outputs.warn_on_disk_error(say, "loss curve"):
                curve = self.monitor.close()
        if curve:
            say(f"loss curve {curve}" + (f"; samples in {samples[-1].parent}" if samples else ""))
        self.env.accelerator.wait_for_everyone()
        path = self.save_adapter(cfg.output_path)
        if self.caches.pending_latents:  # the run ended before every latent was needed
            self.caches.say_latents()
        say(memory.peak(device))
        if self.caches.vae_offloaded:  # the caller gets the model whole, on the training device
            self.model.base.vae.to(device)
        return TrainResult(path, self.model.base, done, elapsed, loss_before, loss_after, curve, samples,
                           restore=lambda: self.caches.restore_released(device))

    def save_adapter(self, path: Path, log=None, md: dict | None = None) -> Path:
        """Write the adapter of the steps done (main process only; callers synchronise processes first); `md`:
        metadata on top of the run's."""
        if not self.env.main:
            return path
        return save_adapter(path, self.cfg, self.model, self.data, self.lora.targets, steps=self.done,
                            started=self.started, unwrap=self.env.accelerator.unwrap_model, say=self.say,
                            log=log or self.say, tokens=self.lora.tokens, extra=md)


class _Marks:
    """Wall-clock marks for benchmarks/bench_speed.py: with SDLORA_STEP_TIMES=FILE set, one line "label unix-time"
    when the first step starts and when each step ends, with the number of latents cached so far (appended;
    nothing happens without the variable)."""

    def __init__(self):
        path = os.environ.get("SDLORA_STEP_TIMES")
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, label: str) -> None:
        if self.file:
            self.file.write(f"{label} {time.time():.6f}\n")
            self.file.flush()


def _forwards(inst: list[Example], cls: list[Example]) -> list[list[Example]]:
    """The forwards of a micro-step: instance and class examples train together when they have the same size
    (always, unless buckets put them apart); otherwise one forward each."""
    if cls and inst[0].size == cls[0].size:
        return [inst + cls]
    return [inst] + ([cls] if cls else [])


def _lora_params(adapted: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{c}/{n}": p for c, m in adapted.items() for n, p in m.named_parameters() if p.requires_grad}
