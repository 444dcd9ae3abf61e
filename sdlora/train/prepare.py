"""The phases of a run before LoRA exists, in the order `loop.train` calls them: the inputs checked before anything
heavy loads (`check_inputs`), the accelerator (`setup`), the base model (`load_model`), class images for prior
preservation (`make_class_images`), and the examples with the step arithmetic (`make_examples`). Each returns what
the next ones need, as a small record."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from sdlora import bounds, outputs, quant
from sdlora.bigload import load_options, with_t5_length
from sdlora.config import TrainConfig
from sdlora.data import masks
from sdlora.data.buckets import make_buckets
from sdlora.data.captions import PromptRules
from sdlora.data.examples import Example
from sdlora.data.images import display_name
from sdlora.data.kohya_folders import scan_dataset, scan_folder
from sdlora.data.schedule import Schedule
from sdlora.errors import SdloraError
from sdlora.lora.targets import preset_targets
from sdlora.models import load_base
from sdlora.train import DTYPES, init_lora, long_prompts, memory, optim, recipe, scale, speed, swap, validation
from sdlora.train import step as S
from sdlora.train.prior import ensure_class_images


def quiet(*_a, **_k) -> None:
    pass


@dataclass
class Env:
    """Where the run computes: the accelerator, whether this is the main process, its log."""
    accelerator: Accelerator
    main: bool
    say: object  # the log of the main process; other processes say nothing
    weight_dtype: torch.dtype  # frozen weights compute in it; LoRA weights stay fp32 (stable updates in fp16/bf16)
    fsdp: bool

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Model:
    """The base model as the run uses it: its native or chosen resolution and its training objective."""
    base: object  # models.BaseModel
    resolution: int
    objective: object

    @property
    def tes(self) -> dict:
        """component -> text encoder: "te", or "te1" + "te2" for SDXL; CLIP-L + T5-XXL for SD3/FLUX."""
        return {c: te for c, (_, te) in self.base.text_encoders.items()}


@dataclass
class Examples:
    """What the run trains on, and for how many steps."""
    dataset: object  # dataset.Dataset, as `sdlora scan` prints it
    rules: PromptRules
    instance: list[Example]
    classes: list[Example]
    schedule: Schedule  # from the start; a resumed run continues from its checkpoint's position
    steps: int
    validation: list[Example] = field(default_factory=list)  # held-out images (--validation-split/-images)


# ---- 1. the inputs, checked before anything heavy loads: a bad file must not cost a model load
def check_inputs(cfg: TrainConfig, log, given_base=None) -> tuple[TrainConfig, outputs.Planned, object]:
    """The config to run (--vram may choose settings), the output plan, and the scanned data set."""
    cfg = _check_memory(cfg, log, given_base)
    plan = outputs.check_paths(cfg)  # outputs writable and harmless before anything loads (outputs.py)
    optim.load_package(cfg.optimizer)  # a missing optimizer package fails before the model loads
    # the same scan `sdlora scan` prints: concepts (kohya N_words folders) and repeats, every image decoded
    dataset = scan_dataset(cfg.images, cfg.class_folder)
    dataset.check(cfg.prompt, cfg.skip_bad_images, log, cfg.repeats)  # repeats bounded (bounds.py)
    if cfg.epochs:  # at least one batch per `batch_size` images an epoch: refuse a run past MAX_STEPS now
        bounds.steps_for_epochs(cfg.epochs, math.ceil(dataset.per_epoch(cfg.repeats) / cfg.batch_size),
                                cfg.grad_accum)
    init_lora.read(cfg)  # an unreadable --init-lora, a missing mask or validation folder fail before the model loads
    masks.check_folders(cfg, dataset)
    if cfg.class_prompt and not dataset.class_images and cfg.num_class_images == 0:
        raise SdloraError(f"no class images in {cfg.class_folder}; add some, or pass --num-class-images N to generate "
                          "them")
    return cfg, plan, dataset


def _check_memory(cfg: TrainConfig, log, given_base) -> TrainConfig:
    """--vram: plan the run for the GPU (no weights read) and take the plan's settings; --blocks-to-swap N: check
    N against the model's blocks. Both before anything heavy loads."""
    if not cfg.vram and not cfg.blocks_to_swap:
        return cfg
    from sdlora import plan

    if given_base is None and not cfg.vram:
        try:
            shape = plan.shape_of(cfg.model)
        except SdloraError:  # a single file or an unknown hub id: checked once the model is loaded
            return cfg
        swap.check(shape.spec, swap.lengths_of(shape.spec, shape.denoiser), cfg.blocks_to_swap)
        return cfg
    planned = plan.Planner(plan.shape_of(cfg.model), plan.run_of(cfg)).plan(cfg.vram)
    log(planned.text())
    if not planned.fits:
        c, need = planned.smallest
        raise SdloraError(f"--vram {cfg.vram:g}: the run does not fit; the smallest plan ({c.flags()}) needs "
                          f"{need / plan.GIB:.1f} GiB of {planned.budget / plan.GIB:.1f} GiB usable: lower "
                          "--resolution or --batch-size")
    return plan.apply(cfg, planned)


# ---- 2. the accelerator
def setup(cfg: TrainConfig, plan: outputs.Planned, log) -> Env:
    # No DDP buffer broadcast: the only buffers are frozen (CLIP's position ids), and with buckets + prior
    # preservation processes may run different numbers of forwards per step, which per-forward broadcasts deadlock.
    # --compile: accelerate's dynamo plugin compiles what `prepare` wraps (without it, `accelerate launch
    # --dynamo_backend` still applies).
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                      **({"dynamo_backend": cfg.compile_backend} if cfg.compile else {}))
    if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise SdloraError("--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no")
    if cfg.compile and cfg.compile_backend == "inductor":
        speed.check_compile(acc.device)
    fsdp = scale.check_fsdp(acc, cfg)
    if cfg.blocks_to_swap and acc.num_processes > 1:
        raise SdloraError("--blocks-to-swap runs in one process (DDP and FSDP need every weight of a process on its "
                          "GPU); for several GPUs use FSDP without it (configs/accelerate-fsdp-flux.yaml)")
    main = acc.is_main_process
    say = log if main else quiet
    if main:
        outputs.remove_stale_temps(plan, say)
    for mode, flag in ((cfg.base_precision, "--base-precision"), (cfg.te_precision, "--te-precision")):
        if mode:  # a mode this torch / bitsandbytes / device cannot run fails here, before the model loads
            quant.check_mode(mode, acc.device, flag)
    set_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG
    return Env(acc, main, say, DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision], fsdp)


# ---- 3. the base model
def load_model(cfg: TrainConfig, env: Env, given_base=None) -> Model:
    precision = precision_of(cfg)
    if given_base is not None and precision.any:
        given_base.kept_precision = quant.apply(given_base, precision)
    base = given_base or load_base(cfg.model, prediction_type=cfg.prediction_type, precision=precision,
                                   options=load_options(cfg, defer_denoiser=True))
    if cfg.t5xxl_max_token_length:  # built-in models too (big ones had it applied while loading)
        base.spec = with_t5_length(base.spec, cfg.t5xxl_max_token_length, base.variant)
    base.spec = long_prompts.apply(cfg, base)  # --clip-skip, --max-token-length on its CLIP encoders
    for c in base.kept_precision:
        env.say(f"--te-precision {cfg.te_precision}: text encoder {c} trains, so it stays in "
                f"{str(env.weight_dtype).removeprefix('torch.')} (pass --no-text-encoder to store it too)")
    model = Model(base, cfg.max_resolution or base.native_resolution,
                  recipe.objective(cfg, base.spec, base.noise_scheduler, base.denoiser.config, base.prediction_type))
    check_family(cfg, base)
    swap.check(base.spec, swap.lengths_of(base.spec, base.denoiser), cfg.blocks_to_swap)
    for m in base.modules.values():
        m.requires_grad_(False)
    # The UNet and text encoders go to the device in add_lora, once their frozen weights are in the compute
    # dtype: moved now, in fp32, an SDXL base alone would take 12.9 GiB of the GPU (6.6 GiB in bf16).
    vae = base.vae
    memory.move(vae, env.device)  # one tensor at a time: no second copy of the model
    vae.to(env.device)  # buffers
    if vae.dtype != torch.float32:  # the VAE only encodes; fp16 VAEs are the usual source of NaN latents
        vae.to(torch.float32)
    return model


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


def precision_of(cfg: TrainConfig) -> quant.Precision:
    """The storage precisions of the frozen base (--base/--te-precision), computing in --mixed-precision's dtype;
    text encoders that train keep theirs."""
    compute = DTYPES["fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision]
    return quant.Precision(cfg.base_precision, cfg.te_precision, compute, _trained_te(cfg))


def _trained_te(cfg: TrainConfig):
    """spec -> the text encoders (kohya components) this run trains: CLIP, unless --no-text-encoder or the preset
    adapts none of it (T5-XXL always stays frozen)."""
    return lambda spec: {c for c in spec.trainable_te_components
                         if not cfg.no_text_encoder and preset_targets(cfg.preset, c, spec)}


def trained_text_encoders(cfg: TrainConfig, model: Model) -> dict:
    """The text encoders this preset trains in this family (CLIP only: T5-XXL stays frozen, its output cached)."""
    tes, spec = model.tes, model.base.spec
    return {c: tes[c] for c in spec.trainable_te_components
            if not cfg.no_text_encoder and preset_targets(cfg.preset, c, spec)}


# ---- 4. class images for prior preservation, generated by the base model before any LoRA exists
def make_class_images(cfg: TrainConfig, env: Env, model: Model, dataset) -> None:
    """Generate the missing class images into --class-images and scan that folder again (`dataset.classes`)."""
    base = model.base
    if not cfg.class_prompt or len(dataset.class_images) >= cfg.num_class_images or dataset.class_parent:
        return
    if base.deferred:  # generating needs the denoiser now, with the text encoders
        base.materialise()
    if env.main:
        for m in base.modules.values():  # generating needs the whole model on the device (fp32 here)
            m.to(env.device)
        with env.accelerator.autocast():
            ensure_class_images(base, cfg.class_prompt, cfg.class_folder, cfg.num_class_images, model.resolution,
                                seed=cfg.seed, log=env.say)
    env.accelerator.wait_for_everyone()
    dataset.classes = scan_folder(cfg.class_folder, is_class=True)[0]  # now with the generated images
    dataset.check(cfg.prompt, cfg.skip_bad_images, log=quiet)  # instance images were reported already
    bad = [p for c in dataset.classes for p, _ in c.bad]
    if bad:
        env.say(f"warning: skipping {len(bad)} unreadable class image(s): " + ", ".join(map(display_name, bad)))
    if not dataset.class_images:
        raise SdloraError(f"{cfg.class_folder} (--class-images) has no images; add .jpg/.png/.webp files to it")


# ---- 5. examples: captions, sizes, and the step arithmetic
def make_examples(cfg: TrainConfig, env: Env, model: Model, dataset) -> Examples:
    rules = PromptRules(cfg.prompt, cfg.trigger_text, cfg.shuffle_tags, cfg.keep_tags, cfg.caption_dropout)
    instance, classes, buckets = [], [], None
    sizes = cfg.resolutions if cfg.resolutions and len(cfg.resolutions) > 1 else (model.resolution,)
    for r in sizes:  # --resolution 512,768: every image at every size, each size with its own buckets
        buckets = make_buckets(r, max(8, r // 8)) if cfg.buckets else None
        inst, cls = dataset.examples(rules, r, buckets, cfg.trigger, cfg.class_prompt, warn=r == sizes[-1])
        instance, classes = instance + inst, classes + cls
    instance, held = validation.held_out(cfg, instance, rules, sizes[-1], buckets, env.say)
    masks.attach(instance + ([] if cfg.validation_images else held), cfg.masks, cfg.alpha_mask, env.say)
    schedule = new_schedule(cfg, env, instance, classes)
    per_epoch = schedule.batches_per_epoch()
    steps = bounds.steps_for_epochs(cfg.epochs, per_epoch, cfg.grad_accum) if cfg.epochs else cfg.steps
    data = Examples(dataset, rules, instance, classes, schedule, steps, held)
    _say_examples(cfg, env, model, data, per_epoch, buckets)
    return data


def new_schedule(cfg: TrainConfig, env: Env, instance: list[Example], classes: list[Example],
                 position: dict | None = None) -> Schedule:
    acc = env.accelerator
    return Schedule(instance, classes, cfg.batch_size, cfg.repeats, cfg.seed, acc.process_index, acc.num_processes,
                    position)


def _say_examples(cfg: TrainConfig, env: Env, model: Model, data: Examples, per_epoch: int, buckets) -> None:
    """The data, a few final captions, and how images, batches, accumulation and processes make the steps."""
    say, acc, instance, classes, steps = env.say, env.accelerator, data.instance, data.classes, data.steps
    n_captioned = sum(e.has_caption for e in instance)
    say(f"data: {len(instance)} instance images ({n_captioned} with caption files)"
        + (f", {len(classes)} class images ('{cfg.class_prompt}', loss weight {cfg.prior_loss_weight})"
           if classes else "")
        + (f", {len(set(e.size for e in instance))} aspect buckets" if buckets else
           f", {', '.join(map(str, sorted({e.size[0] for e in instance})))}px"))
    base = model.base
    long = S.long_captions(base.spec, list(base.text_encoders.values()),
                           {e.caption: display_name(e.path) for e in reversed(instance + classes)})
    if long:
        say(long)
    for ex in instance[:3]:
        say(f"  e.g. {display_name(ex.path)}: '{bounds.shown(data.rules.final(ex.caption, random.Random(0)))}'")
    seen = (f"{len(instance)} images × {cfg.repeats} repeats" if all(e.repeats == 1 for e in instance) else
            f"{len(instance)} images × folder repeats = {sum(e.repeats for e in instance) * cfg.repeats}")
    say(f"steps: {seen} / batch {cfg.batch_size}"
        + (f" / {acc.num_processes} processes" if acc.num_processes > 1 else "")
        + f" = {per_epoch} batches per epoch; {steps} steps × {cfg.grad_accum} accumulation = "
        f"{steps * cfg.grad_accum / per_epoch:.1f} epochs")
    say(f"effective batch: {cfg.batch_size} × {cfg.grad_accum} accumulation × {acc.num_processes} processes = "
        f"{cfg.batch_size * cfg.grad_accum * acc.num_processes} instance images per optimizer step"
        + (" (+ as many class images)" if classes else "")
        + f"; lr {cfg.lr:g} as given, not scaled with the batch or process count")
