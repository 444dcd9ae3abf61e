"""DreamBooth-LoRA training on accelerate, readable top to bottom: `_Run.run` calls the phases in order (data,
model, class images, examples, LoRA, caches, optimizer, resume, loop, finish). The loss of a step is
`step.batch_loss`; which examples a step sees is `data.Schedule`; the file's metadata is `formats.meta.build`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdlora import bounds, outputs, quant
from sdlora.archs.spec import DENOISER
from sdlora.bigload import load_options, with_t5_length
from sdlora.cache import EmbeddingCache, LatentCache, default_cache_dir, once
from sdlora.config import TrainConfig
from sdlora.data.buckets import make_buckets
from sdlora.data.captions import PromptRules, tag_frequency
from sdlora.data.examples import Example
from sdlora.data.images import display_name
from sdlora.data.kohya_folders import scan_dataset, scan_folder
from sdlora.data.schedule import Schedule
from sdlora.errors import SdloraError
from sdlora.formats import kohya, layouts, meta
from sdlora.formats.read import parse
from sdlora.formats.verify import verify
from sdlora.lora.inject import add_lora, collect_modules, format_table, network_metadata, network_of, report
from sdlora.lora.targets import check_rank, find_targets, preset_targets
from sdlora.models import BUILTIN_MODELS, load_base
from sdlora.train import DTYPES, ckpt, memory, optim, scale, speed, swap
from sdlora.train import step as S
from sdlora.train.monitor import Monitor, sample_prompts
from sdlora.train.prior import ensure_class_images


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
        return _Run(cfg, log, base).run()
    finally:
        _reset_accelerate()


def check_family(cfg: TrainConfig, base) -> None:
    """Refuse options the base model's family cannot train, before any work: one line naming the fix."""
    spec = base.spec
    if spec.network_kinds and cfg.network not in spec.network_kinds:
        raise SdloraError(f"--network {cfg.network} is not available for {spec.label} (kohya files fuse its q/k/v "
                          f"projections, which only a plain LoRA can be written for); use --network lora")
    if cfg.dora and spec.network_kinds:
        raise SdloraError(f"--dora is not available for {spec.label} (fused q/k/v projections); drop --dora")
    if spec.objective == "flow" and cfg.min_snr_gamma:
        raise SdloraError(f"--min-snr-gamma is for ε/v-prediction models; {spec.label} trains with rectified flow: "
                          "drop --min-snr-gamma")
    if spec.objective == "flow" and cfg.prediction_type:
        raise SdloraError(f"--prediction-type does not apply to {spec.label} (rectified flow); drop it")


def _reset_accelerate() -> None:
    """accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with other settings
    (e.g. bf16 after fp32). A single-process caller (tests, the app) may train again with other settings, so the
    state is reset; a launched multi-process run ends with this call anyway.

    accelerate has no public way to reset it: `AcceleratorState._reset_state` is what its own test base class
    (`accelerate.test_utils.AccelerateTestCase.tearDown`) calls between tests."""
    from accelerate.state import AcceleratorState, PartialState, is_initialized

    if not is_initialized() or PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


LOG_EVERY = 10  # steps between reads of the loss from the device (progress bar, loss curve, NaN check)


def _quiet(*_a, **_k) -> None:
    pass


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


class _Run:
    """One training run: its phases, in the order `run` calls them, and what they share."""

    def __init__(self, cfg: TrainConfig, log, base=None):
        self.cfg, self.log, self.given_base = cfg, log, base
        self.started = datetime.now(timezone.utc)
        self.samples: list[Path] = []

    def run(self) -> TrainResult:
        self.check_data()
        with outputs.run_lock(self.plan, "--out" if self.cfg.out else "--output-dir/--name"):
            self.setup()
            self.load_model()
            self.make_class_images()
            self.make_examples()
            self.encode_first()
            self.add_lora()
            self.fill_caches()
            self.prepare_optimizer()
            self.resume()
            return self.loop()

    # ---- 1. data, checked before anything heavy loads: a bad file must not cost a model load
    def check_data(self) -> None:
        self.check_memory()
        cfg = self.cfg
        self.plan = outputs.check_paths(cfg)  # outputs writable and harmless before anything loads (outputs.py)
        optim.load_package(cfg.optimizer)  # a missing optimizer package fails before the model loads
        # the same scan `sdlora scan` prints: concepts (kohya N_words folders) and repeats, every image decoded
        self.dataset = scan_dataset(cfg.images, cfg.class_folder)
        self.dataset.check(cfg.prompt, cfg.skip_bad_images, self.log, cfg.repeats)  # repeats bounded (bounds.py)
        if cfg.epochs:  # at least one batch per `batch_size` images an epoch: refuse a run past MAX_STEPS now
            bounds.steps_for_epochs(cfg.epochs, math.ceil(self.dataset.per_epoch(cfg.repeats) / cfg.batch_size),
                                    cfg.grad_accum)
        self.instance_images, self.class_images = self.dataset.instance_images, self.dataset.class_images
        folder = cfg.class_folder
        if cfg.class_prompt and not self.class_images and cfg.num_class_images == 0:
            raise SdloraError(f"no class images in {folder}; add some, or pass --num-class-images N to generate them")

    def check_memory(self) -> None:
        """--vram: plan the run for the GPU (no weights read) and take the plan's settings; --blocks-to-swap N: check
        N against the model's blocks. Both before anything heavy loads."""
        cfg = self.cfg
        if not cfg.vram and not cfg.blocks_to_swap:
            return
        from sdlora import plan

        if self.given_base is None and not cfg.vram:
            try:
                shape = plan.shape_of(cfg.model)
            except SdloraError:  # a single file or an unknown hub id: checked once the model is loaded
                return
            swap.check(shape.spec, swap.lengths_of(shape.spec, shape.denoiser), cfg.blocks_to_swap)
            return
        planned = plan.Planner(plan.shape_of(cfg.model), plan.run_of(cfg)).plan(cfg.vram)
        self.log(planned.text())
        if not planned.fits:
            c, need = planned.smallest
            raise SdloraError(f"--vram {cfg.vram:g}: the run does not fit; the smallest plan ({c.flags()}) needs "
                              f"{need / plan.GIB:.1f} GiB of {planned.budget / plan.GIB:.1f} GiB usable: lower "
                              "--resolution or --batch-size")
        self.cfg = plan.apply(cfg, planned)

    def setup(self) -> None:
        cfg = self.cfg
        # No DDP buffer broadcast: the only buffers are frozen (CLIP's position ids), and with buckets + prior
        # preservation processes may run different numbers of forwards per step, which per-forward broadcasts deadlock.
        # --compile: accelerate's dynamo plugin compiles what `prepare` wraps (without it, `accelerate launch
        # --dynamo_backend` still applies).
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                                       **({"dynamo_backend": cfg.compile_backend} if cfg.compile else {}))
        if cfg.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            raise SdloraError("--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no")
        if cfg.compile and cfg.compile_backend == "inductor":
            speed.check_compile(self.accelerator.device)
        self.fsdp = scale.check_fsdp(self.accelerator, cfg)
        if cfg.blocks_to_swap and self.accelerator.num_processes > 1:
            raise SdloraError("--blocks-to-swap runs in one process (DDP and FSDP need every weight of a process on its "
                              "GPU); for several GPUs use FSDP without it (configs/accelerate-fsdp-flux.yaml)")
        self.main = self.accelerator.is_main_process
        self.say = self.log if self.main else _quiet
        if self.main:
            outputs.remove_stale_temps(self.plan, self.say)
        # Frozen weights compute in this dtype, LoRA weights in fp32 (stable updates under fp16/bf16).
        self.weight_dtype = DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision]
        for mode, flag in ((cfg.base_precision, "--base-precision"), (cfg.te_precision, "--te-precision")):
            if mode:  # a mode this torch / bitsandbytes / device cannot run fails here, before the model loads
                quant.check_mode(mode, self.accelerator.device, flag)
        set_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG

    # ---- 2. model
    def load_model(self) -> None:
        cfg, precision = self.cfg, _precision(self.cfg)
        if self.given_base is not None and precision.any:
            self.given_base.kept_precision = quant.apply(self.given_base, precision)
        base = self.base = self.given_base or load_base(cfg.model, prediction_type=cfg.prediction_type,
                                                        precision=precision,
                                                        options=load_options(cfg, defer_denoiser=True))
        if cfg.t5xxl_max_token_length:  # built-in models too (big ones had it applied while loading)
            base.spec = with_t5_length(base.spec, cfg.t5xxl_max_token_length, base.variant)
        for c in base.kept_precision:
            self.say(f"--te-precision {cfg.te_precision}: text encoder {c} trains, so it stays in "
                     f"{str(self.weight_dtype).removeprefix('torch.')} (pass --no-text-encoder to store it too)")
        self.resolution = self.cfg.resolution or base.native_resolution
        self.objective = S.objective_for(base.spec, base.noise_scheduler, base.denoiser.config)
        check_family(self.cfg, base)
        swap.check(base.spec, swap.lengths_of(base.spec, base.denoiser), self.cfg.blocks_to_swap)
        self.denoiser, self.vae = base.denoiser, base.vae
        self.tes = {c: te for c, (_, te) in base.text_encoders.items()}  # "te", or "te1" + "te2" for SDXL
        for m in base.modules.values():
            m.requires_grad_(False)
        # The UNet and text encoders go to the device in add_lora, once their frozen weights are in the compute
        # dtype: moved now, in fp32, an SDXL base alone would take 12.9 GiB of the GPU (6.6 GiB in bf16).
        memory.move(self.vae, self.accelerator.device)  # one tensor at a time: no second copy of the model
        self.vae.to(self.accelerator.device)  # buffers
        if self.vae.dtype != torch.float32:  # the VAE only encodes; fp16 VAEs are the usual source of NaN latents
            self.vae.to(torch.float32)

    # ---- 3. class images for prior preservation, generated by the base model before any LoRA exists
    def make_class_images(self) -> None:
        cfg = self.cfg
        if not cfg.class_prompt or len(self.class_images) >= cfg.num_class_images or self.dataset.class_parent:
            return
        if self.base.deferred:  # generating needs the denoiser now, with the text encoders
            self.base.materialise()
            self.denoiser = self.base.denoiser
        if self.main:
            for m in self.base.modules.values():  # generating needs the whole model on the device (fp32 here)
                m.to(self.accelerator.device)
            with self.accelerator.autocast():
                ensure_class_images(self.base, cfg.class_prompt, cfg.class_folder, cfg.num_class_images,
                                    self.resolution, seed=cfg.seed, log=self.say)
        self.accelerator.wait_for_everyone()
        self.dataset.classes = scan_folder(cfg.class_folder, is_class=True)[0]  # now with the generated images
        self.dataset.check(cfg.prompt, cfg.skip_bad_images, log=_quiet)  # instance images were reported already
        bad = [p for c in self.dataset.classes for p, _ in c.bad]
        if bad:
            self.say(f"warning: skipping {len(bad)} unreadable class image(s): " + ", ".join(map(display_name, bad)))
        self.class_images = self.dataset.class_images
        if not self.class_images:
            raise SdloraError(f"{cfg.class_folder} (--class-images) has no images; add .jpg/.png/.webp files to it")

    # ---- 4. examples: captions, sizes, and the step arithmetic
    def make_examples(self) -> None:
        cfg, acc, say = self.cfg, self.accelerator, self.say
        rules = self.rules = PromptRules(cfg.prompt, cfg.trigger_text, cfg.shuffle_tags, cfg.keep_tags,
                                         cfg.caption_dropout)
        buckets = make_buckets(self.resolution, max(8, self.resolution // 8)) if cfg.buckets else None
        instance, classes = self.dataset.examples(rules, self.resolution, buckets, cfg.trigger, cfg.class_prompt)
        self.instance, self.classes = instance, classes
        self.schedule = self.new_schedule()
        per_epoch = self.schedule.batches_per_epoch()
        self.steps = bounds.steps_for_epochs(cfg.epochs, per_epoch, cfg.grad_accum) if cfg.epochs else cfg.steps
        self.prng = random.Random(cfg.seed + 3)
        n_captioned = sum(e.has_caption for e in instance)
        say(f"data: {len(instance)} instance images ({n_captioned} with caption files)"
            + (f", {len(classes)} class images ('{cfg.class_prompt}', loss weight {cfg.prior_loss_weight})"
               if classes else "")
            + (f", {len(set(e.size for e in instance))} aspect buckets" if buckets else f", {self.resolution}px"))
        long = S.long_captions(self.base.spec, list(self.base.text_encoders.values()),
                               {e.caption: display_name(e.path) for e in reversed(instance + classes)})
        if long:
            say(long)
        for ex in instance[:3]:
            say(f"  e.g. {display_name(ex.path)}: '{bounds.shown(rules.final(ex.caption, random.Random(0)))}'")
        seen = (f"{len(instance)} images × {cfg.repeats} repeats" if all(e.repeats == 1 for e in instance) else
                f"{len(instance)} images × folder repeats = {sum(e.repeats for e in instance) * cfg.repeats}")
        say(f"steps: {seen} / batch {cfg.batch_size}"
            + (f" / {acc.num_processes} processes" if acc.num_processes > 1 else "")
            + f" = {per_epoch} batches per epoch; {self.steps} steps × {cfg.grad_accum} accumulation = "
            f"{self.steps * cfg.grad_accum / per_epoch:.1f} epochs")
        say(f"effective batch: {cfg.batch_size} × {cfg.grad_accum} accumulation × {acc.num_processes} processes = "
            f"{cfg.batch_size * cfg.grad_accum * acc.num_processes} instance images per optimizer step"
            + (" (+ as many class images)" if classes else "")
            + f"; lr {cfg.lr:g} as given, not scaled with the batch or process count")

    def new_schedule(self, position: dict | None = None) -> Schedule:
        cfg, acc = self.cfg, self.accelerator
        return Schedule(self.instance, self.classes, cfg.batch_size, cfg.repeats, cfg.seed, acc.process_index,
                        acc.num_processes, position)

    # ---- 4b. a big model loaded piece by piece (SD3/FLUX, sdlora/bigload.py) defers its denoiser: every prompt
    # is encoded first, and the frozen text encoders whose outputs are all cached (T5-XXL above all) leave memory
    # before the denoiser is read, so the two never share the host's memory
    def encode_first(self) -> None:
        base = self.base
        if not base.deferred:
            return
        self.make_text_caches()
        if self.text_cache is not None and self.pending_text:
            for p in self.prompts:
                self.text_cache.get([p])
        for c, cache in self.frozen_text.items():
            if c in self.pending_frozen:
                for p in self.prompts:
                    cache.get([p])
        self.release_cached()
        gone = [a for a, m in base.modules.items() if a not in base.deferred and memory.released(m)]
        self.say(f"text: {len(self.prompts)} prompts encoded first" + (f"; {', '.join(gone)} left memory before the "
                                                                        f"{base.spec.denoiser} loads" if gone else ""))
        base.materialise()
        self.denoiser = base.denoiser
        self.denoiser.requires_grad_(False)

    def trained_text_encoders(self) -> dict:
        """The text encoders this preset trains in this family (CLIP only: T5-XXL stays frozen, its output cached)."""
        cfg, spec = self.cfg, self.base.spec
        return {c: self.tes[c] for c in spec.trainable_te_components
                if not cfg.no_text_encoder and preset_targets(cfg.preset, c, spec)}

    # ---- 5. LoRA
    def add_lora(self) -> None:
        cfg, base = self.cfg, self.base
        trained_tes = self.trained_text_encoders()
        self.train_te = bool(trained_tes)
        adapted = self.adapted = {DENOISER: self.denoiser} | trained_tes
        self.targets = {c: find_targets(m, c, cfg.preset, base.spec) for c, m in adapted.items()}
        check_rank(adapted, self.targets, cfg.rank, base.name)
        for c, m in adapted.items():
            add_lora(m, self.targets[c], cfg.rank, cfg.network_alpha, network_of(cfg))
        if self.main:  # estimated bytes written vs free space, before latents are cached and steps run
            outputs.check_space(outputs.estimate_for_run(cfg, self.plan, adapted, self.instance + self.classes,
                                                         self.steps, self.resolution))
        self.say(f"model {base.name} ({base.arch}, {base.prediction_type}); preset '{cfg.preset}', rank {cfg.rank}, "
                 f"alpha {cfg.network_alpha:g} (scale {cfg.network_alpha / cfg.rank:g})")
        self.say(format_table([self.file_report(m, c) for c, m in adapted.items()]))
        dtype_of = lambda p: torch.float32 if p.requires_grad else self.weight_dtype
        # --blocks-to-swap: the swapped blocks' frozen weights stay in host memory (cast there), the rest moves
        self.swap = swap.enable(base.spec, self.denoiser, cfg.blocks_to_swap, self.accelerator.device, dtype_of)
        for m in ([] if self.swap else [self.denoiser]) + list(self.tes.values()):  # T5-XXL too: frozen, compute dtype
            if memory.released(m):  # its outputs are all cached already (encode_first)
                continue
            # cast and moved one tensor at a time: never the fp32 base on the device, no second copy in memory
            memory.move(m, self.accelerator.device, dtype_of)
            m.to(self.accelerator.device)  # buffers
        if self.swap:
            self.say(swap.describe(base.spec, self.denoiser, cfg.blocks_to_swap))
        speed.set_attention(self.denoiser, cfg.attention, self.accelerator.device)
        if cfg.channels_last:
            speed.channels_last(self.denoiser)
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            for c, m in adapted.items():
                if c != DENOISER:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def file_report(self, module, component: str):
        """The run table's row of `component`, counting the modules its file holds (what `_write_adapter` writes:
        SD3/FLUX fuse the q/k/v LoRAs of an attention into one module, as kohya names them)."""
        r = report(module, component)
        layers = {component: collect_modules(module)}
        r.written = len(kohya.from_trained(layers, self.base.arch, layouts.originals(self.base)).modules)
        return r

    # ---- 6. caches: latents always (memory, and disk unless --no-cache); prompts when the text encoder is frozen.
    # A latent or prompt embedding is computed when a step first needs it (disk-cache hits are read then too), so
    # the first step does not wait for the whole data set. Once every latent the run can need is cached the VAE
    # leaves memory, and so do frozen text encoders once every prompt is (only when prompts are a fixed set: no tag
    # shuffling); sample grids and the caller get them back, reloaded (`frozen_loaded`, `TrainResult.base`).
    # Which noise and timesteps a step draws never depends on what was cached. A multi-process run encodes every
    # latent up front on the main process (the others read the disk cache) and keeps its modules.
    def fill_caches(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.cache_dir = cache_dir = (None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir
                                      else default_cache_dir())
        self.latent_cache = LatentCache(self.vae, cache_dir, self.say_damage())
        self.make_text_caches()
        flips = (False,) if cfg.no_flip else (False, True)
        examples = self.instance + self.classes
        self.vae_offloaded = False
        # what the run can ask the caches for: every example in every flip
        self.pending_latents = {self.latent_cache.key(ex, f) for ex in examples for f in flips} if self.lazy else None
        if self.lazy:
            return
        if self.main:
            for ex in tqdm(examples, desc="caching latents", unit="img", leave=False):
                for f in flips:
                    self.latent_cache.get(ex, f)
            self.say_latents()
        acc.wait_for_everyone()
        # latents are cached: the VAE leaves the GPU until a sample grid needs it (a cache miss encodes on the CPU)
        self.vae_offloaded = memory.offload(self.vae, acc.device)

    def say_damage(self):
        """A damaged cache entry is recomputed and said once per run (all caches share the one message)."""
        if not hasattr(self, "_say_damage"):
            self._say_damage = once(self.say)
        return self._say_damage

    def make_text_caches(self) -> None:
        """The text caches (once: `encode_first` may have filled them already) and the prompt keys they must hold
        before their encoders may leave memory (None / {}: the prompts are not a fixed set)."""
        if hasattr(self, "text_cache"):
            return
        cfg, acc, spec = self.cfg, self.accelerator, self.base.spec
        cache_dir = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        trained = self.trained_text_encoders()
        train_te = bool(trained)
        # with text encoders trained, the ones that stay frozen (SD3/FLUX's T5-XXL) have their outputs cached alone
        self.frozen_text = {t.component: EmbeddingCache([self.base.text_encoders[t.component]],
                                                        dataclasses.replace(spec, text_encoders=(t,)), cache_dir,
                                                        self.say_damage())
                            for t in spec.text_encoders if train_te and t.component not in trained}
        self.text_cache = (None if train_te
                           else EmbeddingCache(list(self.base.text_encoders.values()), spec, cache_dir,
                                               self.say_damage()))
        self.lazy = acc.num_processes == 1
        examples = self.instance + self.classes
        self.prompts = sorted({e.caption for e in examples} | ({""} if cfg.caption_dropout else set()))
        self.pending_text = ({self.text_cache.key(p) for p in self.prompts}
                             if self.lazy and self.text_cache is not None and not cfg.shuffle_tags else None)
        self.pending_frozen = ({c: {cache.key(p) for p in self.prompts} for c, cache in self.frozen_text.items()}
                               if self.lazy and not cfg.shuffle_tags else {})

    def say_latents(self) -> None:
        st = self.latent_cache.store
        self.say(f"latents: {st.hits} from cache, {st.misses} encoded"
                 + (f" ({st.rebuilt} damaged entries recomputed)" if st.rebuilt else "")
                 + (f" ({self.cache_dir})" if self.cache_dir else ""))

    def release_cached(self) -> None:
        """Free the VAE once every latent is cached, and frozen text encoders once every prompt embedding is."""
        if getattr(self, "pending_latents", None) and _all_in(self.pending_latents, self.latent_cache.store.memory):
            self.pending_latents = None
            self.say_latents()
            memory.release(self.vae)
        if self.pending_text and _all_in(self.pending_text, self.text_cache.store.memory):
            self.pending_text = None
            for m in self.tes.values():
                memory.release(m)
        for c, keys in list(self.pending_frozen.items()):  # T5-XXL beside trained CLIP encoders
            if _all_in(keys, self.frozen_text[c].store.memory):
                del self.pending_frozen[c]
                memory.release(self.tes[c])

    @contextmanager
    def frozen_loaded(self):
        """Inside: every module whole on the training device (released ones reloaded); released again after."""
        gone = self.restore_released()
        try:
            yield
        finally:
            for attr in gone:
                memory.release(self.base.modules[attr])

    def restore_released(self, device: torch.device | None = None) -> list[str]:
        """Reload the weights of released modules (onto `device`, default the training device); their names."""
        gone = [a for a, m in self.base.modules.items() if memory.released(m)]
        if gone:
            fresh = _load_frozen(self.cfg, self.base, gone)
            for a in gone:
                memory.restore(self.base.modules[a], fresh[a], device or self.accelerator.device)
        return gone

    # ---- 7. optimizer, learning-rate schedule, accelerate
    def prepare_optimizer(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        params = [{"params": [p for p in self.denoiser.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.train_te:
            params.append({"params": [p for m in self.tes.values() for p in m.parameters() if p.requires_grad],
                           "lr": cfg.te_lr or cfg.lr})
        self.trainable = [p for g in params for p in g["params"]]
        if self.fsdp:  # the frozen base is sharded, the LoRA weights stay whole on every process
            scale.keep_whole(acc, self.denoiser)
        optimizer = optim.build(cfg.optimizer, cfg.optimizer_kwargs, params, cfg.lr, cfg.weight_decay)
        optim.check_runs(optimizer, acc.device)
        # accelerate steps a prepared scheduler once per process, so its horizon is scaled the same way.
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * acc.num_processes,
                                     num_training_steps=self.steps * acc.num_processes)
        # with block swap the denoiser is placed already (swapped weights in host memory): accelerate must not move it
        self.denoiser_p, self.optimizer, self.lr_scheduler = acc.prepare(
            self.denoiser, optimizer, lr_scheduler, device_placement=[not self.swap, None, None])
        # a module without trainable parameters must not be DDP-wrapped
        self.tes_p = {c: acc.prepare(m) if c in self.adapted else m for c, m in self.tes.items()}
        self.text_encoders_p = [(tok, self.tes_p[c]) for c, (tok, _) in self.base.text_encoders.items()]
        on_device = [m for m in self.base.modules.values() if next(m.parameters()).device == acc.device]
        self.say(memory.estimate(on_device, self.trainable, memory.STATE_BYTES[cfg.optimizer]))

    # ---- 8. resume
    def resume(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.identity = {k: getattr(cfg, k) for k in ckpt.IDENTITY} | {"processes": acc.num_processes}
        self.data_ids = {str(e.path.resolve()): self.latent_cache.digest(e.path) for e in self.instance + self.classes}
        self.ckpt_root = ckpt.checkpoint_root(cfg.output_path)
        self.g = torch.Generator().manual_seed(cfg.seed + 1 + acc.process_index)
        self.done = self.start_step = 0
        if not cfg.resume:
            return
        folder = ckpt.resolve(cfg.resume, self.ckpt_root)
        manifest = ckpt.restore(folder, self.identity, self.data_ids, params=_lora_params(self.adapted),
                                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                rng={"train": self.g, "python": self.prng})
        self.schedule = self.new_schedule(manifest["position"])
        self.done = self.start_step = manifest["step"]  # the summary counts the steps run in this process
        self.say(f"resumed from {folder} at step {self.done}")
        if self.done >= self.steps:
            raise SdloraError(f"{folder} is at step {self.done}, the run has {self.steps} steps: "
                              "pass a larger --steps to go on")

    # ---- what a step trains on
    def cond(self, examples: list[Example], prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        """Denoiser conditioning: text hidden states, and SDXL's pooled text + size/crop micro-conditioning."""
        if self.text_cache is not None:
            hidden, pooled = self.text_cache.get(prompts)
            hidden = hidden.to(self.accelerator.device, self.weight_dtype)
            pooled = pooled.to(self.accelerator.device, self.weight_dtype) if pooled is not None else None
        else:
            given = {c: tuple(None if x is None else x.to(self.accelerator.device, self.weight_dtype)
                              for x in cache.get(prompts)) for c, cache in self.frozen_text.items()}
            hidden, pooled = S.encode_text(self.base.spec, self.text_encoders_p, prompts, given)
        if self.base.spec.micro_conditioning:
            return hidden, S.added_cond(pooled, torch.tensor([e.sdxl_time_ids() for e in examples]))
        return hidden, ({"pooled": pooled} if pooled is not None else None)  # SD3/FLUX: pooled text only

    def batch(self, examples: list[Example]) -> S.Batch:
        sampled = self.latent_cache.sample(examples, self.g, flips=not self.cfg.no_flip)
        latents = S.scale_latents(self.vae.config, sampled.to(self.accelerator.device))
        noise, t = S.sample_noise(latents, self.objective, self.g, self.cfg.noise_offset)
        prompts = [e.caption if e.is_class else self.rules.final(e.caption, self.prng) for e in examples]
        hidden, added = self.cond(examples, prompts)
        self.release_cached()  # before the forward: its activations come on top of what is still held
        return S.Batch(latents, hidden, added, noise, t, n_instance=sum(not e.is_class for e in examples))

    def eval_loss(self) -> float | None:
        """Mean loss of the first two instance examples on fixed noise at two timesteps (4 forwards: less than a
        few training steps); None with --no-eval-loss."""
        if self.cfg.no_eval_loss:
            return None
        examples = self.instance[:2]
        with torch.no_grad(), self.accelerator.autocast(), optim.eval_weights(self.optimizer):
            inputs = [(S.scale_latents(self.vae.config, self.latent_cache.get(ex, False)[0][None].to(
                self.accelerator.device)), self.cond([ex], [ex.caption])) for ex in examples]
            self.release_cached()  # before the forwards: a frozen text encoder may be done already
            total = sum(S.fixed_loss(self.denoiser_p, self.objective, lat, *cond, timesteps=(300, 700))
                        for lat, cond in inputs)
            return total / len(examples)

    # ---- 9. the loop
    def loop(self) -> TrainResult:
        cfg, say = self.cfg, self.say
        self.monitor = Monitor(cfg.output_path, cfg.tensorboard) if self.main else None
        self.sample_prompts = sample_prompts(cfg.sample_prompts, cfg.prompt, cfg.class_prompt)
        loss_before = self.eval_loss()
        self.set_train(True)
        t0 = t_first = time.perf_counter()
        bar = tqdm(total=self.steps, initial=self.done, desc="training", unit="step", disable=not self.main,
                   dynamic_ncols=True)
        self.ema, self.pending = None, []
        mark = _Marks() if self.main else _quiet  # SDLORA_STEP_TIMES: step timestamps for benchmarks/bench_speed.py
        mark("start")
        # Ctrl-C finishes the step under way, so that what is saved (adapter and checkpoint) is a whole step and a
        # resume continues exactly; a second Ctrl-C stops at once.
        stop = ckpt.StopFlag(lambda: say("\nCtrl-C: finishing this step, then saving (press again to abort)"))
        try:
            while self.done < self.steps and not stop.set:
                for _ in range(cfg.grad_accum):
                    loss = self.micro_step()
                self.done += 1
                self.pending.append((self.done, loss.detach(), self.lr_scheduler.get_last_lr()[0]))
                mark(f"step {self.done} cached={len(self.latent_cache.store.memory)}")
                bar.update(1)
                saving = cfg.save_every and self.done % cfg.save_every == 0 and self.done < self.steps
                sampling = cfg.sample_every and self.done % cfg.sample_every == 0
                first = self.done == self.start_step + 1
                if first or saving or sampling or self.done % LOG_EVERY == 0 or self.done >= self.steps or stop.set:
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
        result.steady_seconds = t_end - t_first if self.done > self.start_step + 1 else None
        result.swap_stats = [dict(c) for c in self.swap.stats] if self.swap else None
        return result

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
        bar.set_postfix(loss=f"{self.ema:.4f}", lr=f"{self.pending[-1][2]:.2e}", refresh=False)
        self.pending = []

    def micro_step(self) -> torch.Tensor:
        """One forward and backward (the optimizer steps when gradient accumulation is complete). Nothing here
        waits for the device: the loss is read back by `read_losses`."""
        acc = self.accelerator
        inst, cls = self.schedule.next()
        with acc.accumulate(self.denoiser_p, *self.tes_p.values()), acc.autocast():
            batches = [self.batch(examples) for examples in _forwards(inst, cls)]
            loss = S.batch_loss(self.denoiser_p, self.objective, batches, self.cfg.prior_loss_weight,
                                self.cfg.min_snr_gamma)
            acc.backward(loss)
            if self.fsdp and acc.sync_gradients:
                scale.average_gradients(self.trainable)
            if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def set_train(self, mode: bool) -> None:
        optim.set_mode(self.optimizer, mode)  # schedule-free: training weights (y) vs evaluation weights (x)
        self.denoiser_p.train(mode)
        for m in self.tes_p.values():
            m.train(mode and m in self.adapted.values())

    def checkpoint(self) -> None:
        if not self.main:
            return
        step = self.done
        with outputs.warn_on_disk_error(self.say, f"checkpoint at step {step}"), \
                outputs.finish_before_interrupt(self.say, f"checkpoint {self.ckpt_root / f'step-{step:06d}'}"):
            self._checkpoint(step)

    def _checkpoint(self, step: int) -> None:
        folder = ckpt.save(self.ckpt_root / f"step-{step:06d}", step=step, identity=self.identity, data=self.data_ids,
                           position=self.schedule.position(), params=_lora_params(self.adapted),
                           optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                           rng={"train": self.g.get_state(), "python": self.prng.getstate()},
                           adapter_writer=self._checkpoint_adapter)
        ckpt.prune(self.ckpt_root, self.cfg.keep_last)
        self.say(f"checkpoint {folder}")

    def _checkpoint_adapter(self, path: Path) -> None:
        with optim.eval_weights(self.optimizer):
            self.save_adapter(path, _quiet)

    def sample(self) -> None:
        if self.main:
            self.denoiser.eval()
            with self.accelerator.autocast(), outputs.warn_on_disk_error(self.say, f"sample grid at step {self.done}"), \
                    optim.eval_weights(self.optimizer), self.frozen_loaded(), \
                    memory.on_device(self.vae, self.accelerator.device, self.vae_offloaded):
                self.samples.append(self.monitor.samples(self.done, self.base, self.sample_prompts, self.resolution,
                                                         self.cfg.sample_steps))
            self.denoiser.train()

    def save_interrupted(self) -> None:
        """After a Ctrl-C at a step boundary: checkpoint and adapter of the steps done, then KeyboardInterrupt."""
        say = self.say
        if self.done == 0 or not self.main:
            say("interrupted before the first step; nothing saved")
            raise KeyboardInterrupt
        say(f"interrupted: saving the {self.done} steps trained so far")
        self.checkpoint()
        with optim.eval_weights(self.optimizer):
            self.save_adapter(self.cfg.output_path)
        say("continue with: --resume latest (same settings)")
        if self.monitor:
            self.monitor.close()
        raise KeyboardInterrupt

    # ---- 10. finish
    def finish(self, loss_before: float, elapsed: float) -> TrainResult:
        cfg, say, done = self.cfg, self.say, self.done
        self.set_train(False)
        loss_after = self.eval_loss()
        ran = done - self.start_step
        say(f"{ran} steps in {elapsed:.1f}s ({elapsed / max(ran, 1):.3f} s/step)"
            + (f", steps {self.start_step + 1}-{done} after resuming" if self.start_step else "")
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
        self.accelerator.wait_for_everyone()
        path = self.save_adapter(cfg.output_path)
        if self.pending_latents:  # the run ended before every latent was needed
            self.say_latents()
        say(memory.peak(self.accelerator.device))
        if self.vae_offloaded:  # the caller gets the model whole, on the training device
            self.vae.to(self.accelerator.device)
        return TrainResult(path, self.base, done, elapsed, loss_before, loss_after, curve, samples,
                           restore=lambda device=self.accelerator.device: self.restore_released(device))

    def save_adapter(self, path: Path, say=None) -> Path:
        """Write the adapter of the steps done (main process only; callers synchronise processes first)."""
        if not self.main:
            return path
        cfg = self.cfg
        layers = {c: collect_modules(self.accelerator.unwrap_model(m)) for c, m in self.base.components.items()
                  if c in self.targets}
        stats = meta.RunStats(
            spec=self.base.spec, base_model_version=self.base.base_model_version, variant=self.base.variant,
            model_name=self.base.name,
            targets={c: preset_targets(cfg.preset, c, self.base.spec)[0] for c in self.targets},
            resolution=self.resolution, steps=self.done, num_images=len(self.instance) * cfg.repeats,
            num_reg_images=len(self.classes), tag_frequency={Path(cfg.images).name: tag_frequency(
                [e.caption for e in self.instance])}, started=self.started)
        with outputs.finish_before_interrupt(self.say, f"adapter {path} ({self.done} steps)"):
            md = meta.build(cfg, stats) | meta.dataset_metadata(self.dataset, cfg.repeats, self.instance, self.classes,
                                                                cfg.trigger_text)
            md |= network_metadata(cfg, md, self.base.spec.kohya_network_module)
            return _write_adapter(layers, DTYPES[cfg.save_precision], md, self.base, path, say or self.say,
                                  rescue=path == cfg.output_path)


def _write_adapter(layers: dict, dtype: torch.dtype, md: dict, base, path: Path, say, rescue: bool) -> Path:
    """Write trained `layers` ({component: lora.inject.collect_modules(...)}) as a kohya/LyCORIS file with metadata `md`, verified
    as readers will read it. `rescue`: the run's result, which a full disk saves elsewhere rather than losing."""
    adapter = kohya.from_trained(layers, base.arch, layouts.originals(base))
    tensors = kohya.to_tensors(adapter, dtype)
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise SdloraError("the adapter holds NaN/Inf values; nothing was saved. Lower --lr or use bf16/no precision")
    # Check the file as ComfyUI, A1111, kohya and diffusers will read it. It is written either way (a failed check
    # must not lose the training), but a problem fails the run loudly.
    report_ = verify(parse(tensors, md, where=str(path)), model=base, path=str(path))
    if rescue:
        path = outputs.save_or_rescue(lambda p: kohya.save(tensors, p, md), path)
    else:  # inside a checkpoint folder: its writer handles failures
        path = kohya.save(tensors, path, md)
    say(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, {len(adapter.modules)} modules, {len(tensors)} tensors)")
    for line in report_.lines()[1:-1]:
        say(line)
    if not report_.ok:
        raise SdloraError(f"{path} was saved but does not verify: {report_.problems[0]} (run `sdlora verify {path}`)")
    return path


def _all_in(keys: set, cached: dict) -> bool:
    return len(cached) >= len(keys) and all(k in cached for k in keys)


def _load_frozen(cfg: TrainConfig, base, attrs: list[str]) -> dict:
    """Modules `attrs` of the base model loaded again, as load_model loaded them (at --te-precision too): from a
    diffusers folder or hub id one component each (its weights memory-mapped); a built-in model or single file is
    rebuilt whole, and the rest dropped."""
    if base.loaders:  # loaded piece by piece (sdlora/bigload.py): each component alone, the same way
        return {a: base.loaders[a]() for a in attrs}
    name = cfg.model
    path = Path(name).expanduser()
    precision = _precision(cfg)
    if name in BUILTIN_MODELS or path.suffix.lower() == ".safetensors":
        fresh = load_base(name, prediction_type=cfg.prediction_type, precision=precision)
        return {a: fresh.modules[a] for a in attrs}
    source = str(path) if path.exists() else name
    out = {a: type(base.modules[a]).from_pretrained(source, subfolder=a) for a in attrs}
    for a, m in out.items():  # released modules are frozen text encoders (and the VAE, never stored narrower)
        if cfg.te_precision and any(quant.stored(s) for s in base.modules[a].modules()):
            quant.quantize_(m, cfg.te_precision, precision.compute)
    return out


def _trained_te(cfg: TrainConfig):
    """spec -> the text encoders (kohya components) this run trains: CLIP, unless --no-text-encoder or the preset
    adapts none of it (T5-XXL always stays frozen)."""
    return lambda spec: {c for c in spec.trainable_te_components
                         if not cfg.no_text_encoder and preset_targets(cfg.preset, c, spec)}


def _precision(cfg: TrainConfig) -> quant.Precision:
    compute = DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision]
    return quant.Precision(cfg.base_precision, cfg.te_precision, compute, _trained_te(cfg))


def _forwards(inst: list[Example], cls: list[Example]) -> list[list[Example]]:
    """The forwards of a micro-step: instance and class examples train together when they have the same size
    (always, unless buckets put them apart); otherwise one forward each."""
    if cls and inst[0].size == cls[0].size:
        return [inst + cls]
    return [inst] + ([cls] if cls else [])


def _lora_params(adapted: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{c}/{n}": p for c, m in adapted.items() for n, p in m.named_parameters() if p.requires_grad}
