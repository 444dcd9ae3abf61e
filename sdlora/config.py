"""One typed config for training: defaults, help text and validation in one place.

The CLI flags are generated from these fields, a TOML file given with --config sets any of them, and flags
given on the command line override the file. Everything is checked before any model loads.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from sdlora.errors import SdloraError
from sdlora.lora import kinds
from sdlora.lora.targets import PRESETS
from sdlora.models import DEFAULT_MODEL, model_kinds_help
from sdlora.train import optim, option_checks
from sdlora.train.speed import ATTENTION

MIXED_PRECISION = ("no", "fp16", "bf16")
# storage precision of frozen weights: sdlora.quant.MODES (that module imports torch, this one must not)
BASE_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "nf4")
QUANTISED = ("fp8", "int8", "nf4")
SAVE_PRECISION = ("fp32", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# the noise and loss recipe (issue 20; sdlora/train/recipe.py, losses.py, noise.py, timesteps.py)
LOSSES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "logit-normal", "shift", "flux-shift")
LOG_WITH = ("tensorboard", "wandb", "all")
MAX_RESOLUTION = 4096  # above it only with --force-resolution: latents and memory grow with the square
MAX_RANK = 1024  # a config bound; after the model loads the rank is also checked against the narrowest layer
MAX_SEED = 2**32  # numpy's and accelerate's set_seed take [0, 2**32)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    images: str = _f(MISSING, "folder of instance (subject) images, .txt/.caption files beside them are captions; or a "
                     "kohya-style parent of N_words subfolders (N repeats, 'words' the prompt), e.g. '10_sks dog'")
    prompt: str | None = _f(None, "instance prompt with the trigger word, e.g. 'sks dog' (used for images without a "
                            "caption); optional when --images holds N_words subfolders")
    model: str = _f(DEFAULT_MODEL, model_kinds_help())
    prediction_type: str | None = _f(None, "the base model's objective, for single-file SD 2.x checkpoints whose ε/v "
                                     "guess is wrong (default: detected; see README)", choices=PREDICTION_TYPES,
                                     group="model")
    # the separate parts of FLUX.1 / SD 3.5 single files (kohya's flag names), and T5's prompt length
    clip_l: str | None = _f(None, "CLIP-L weights (e.g. clip_l.safetensors) for a FLUX.1 / SD 3.5 single file "
                            "that lacks them", group="model", metavar="FILE")
    clip_g: str | None = _f(None, "CLIP-G (OpenCLIP bigG) weights (clip_g.safetensors) for an SD 3.5 single file "
                            "that lacks them", group="model", metavar="FILE")
    t5xxl: str | None = _f(None, "T5-XXL weights (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors) for a "
                           "FLUX.1 / SD 3.5 single file that lacks them", group="model", metavar="FILE")
    ae: str | None = _f(None, "VAE weights (ae.safetensors) for a FLUX.1 / SD 3.5 single file that lacks them",
                        group="model", metavar="FILE")
    t5xxl_max_token_length: int | None = _f(None, "T5-XXL tokens per prompt (SD3 and FLUX; default: 512 for "
                                            "FLUX.1-dev, 256 for schnell and SD3); fewer is faster and lighter",
                                            group="model")
    output_dir: str = _f("output", "folder for the adapter file")
    name: str | None = _f(None, "output name (file <output_dir>/<name>.safetensors); default: the images folder's name")
    out: str | None = _f(None, "exact output file path (overrides --output-dir/--name)")
    # what is adapted
    preset: str = _f("default", "target modules: " + ", ".join(PRESETS), choices=tuple(PRESETS))
    rank: int = _f(4, "LoRA rank r")
    alpha: float | None = _f(None, "LoRA alpha; the delta is scaled by alpha/r (default: alpha = rank, scale 1)")
    no_text_encoder: bool = _f(False, "train the UNet only (no LoRA on the text encoder)")
    network: str = _f(kinds.LORA.name, kinds.network_help(), choices=kinds.NETWORKS)
    dora: bool = _f(False, "DoRA (weight-decomposed LoRA, a DoRA scale per input channel) on lora/locon")
    conv_rank: int | None = _f(None, "rank of the 3x3 convs (ResNet blocks, down/up-samplers) locon/loha/lokr adapt "
                               "(default: --rank); with --network lora, adds them")
    conv_alpha: float | None = _f(None, "alpha of those convs (default: --alpha, or --conv-rank when that is given)")
    lokr_factor: int = _f(-1, "LoKr: the small Kronecker factor's size, dividing each dimension "
                          "(-1: the most square split)")
    # ---- issue 20 (text, LoRA+, dropout, schedules, targets): checked by sdlora/train/option_checks.py
    targets: str | None = _f(None, "more modules to adapt beyond --preset: comma-separated regexes searched in the "
                             "module names (e.g. 'attn1\\.to_(q|k|v)', 'ff\\.net'; Linear and 1x1 conv only); "
                             "each must match something", group="LoRA", metavar="REGEX,..")
    exclude: str | None = _f(None, "modules not to adapt: comma-separated regexes searched in the module names "
                             "(applied after --preset and --targets); each must match something", group="LoRA",
                             metavar="REGEX,..")
    loraplus_ratio: float | None = _f(None, "LoRA+: the up (B) matrices learn at R x the learning rate of the down "
                                      "(A) ones (kohya's loraplus_lr_ratio; the paper suggests 16); lora/locon only",
                                      group="LoRA", metavar="R")
    network_dropout: float | None = _f(None, "kohya's network dropout: drop each value of a LoRA's down-projection "
                                       "output with this probability while training (e.g. 0.1); lora/locon only",
                                       group="LoRA", metavar="P")
    rank_dropout: float | None = _f(None, "kohya's rank dropout: drop each rank of a LoRA with this probability per "
                                    "sample while training, the rest scaled up by 1/(1-P); lora/locon only",
                                    group="LoRA", metavar="P")
    module_dropout: float | None = _f(None, "kohya's module dropout: skip a LoRA module's whole delta with this "
                                      "probability per forward while training; lora/locon only", group="LoRA",
                                      metavar="P")
    lr_restarts: int = _f(1, "with --lr-scheduler cosine_with_restarts: the number of cosine cycles (hard restarts "
                          "to the full rate), kohya's lr_scheduler_num_cycles", group="training")
    lr_scheduler_power: float = _f(1.0, "with --lr-scheduler polynomial: the power of the decay (1: linear), kohya's "
                                   "lr_scheduler_power", group="training", metavar="P")
    clip_skip: int | None = _f(None, "condition on the CLIP text encoder's N-th layer from the end (A1111/kohya's "
                               "clip skip; SD 1.x/2.x: then its final layer norm; 1: the last layer, 2: the "
                               "penultimate, SDXL's and SD 3.x's default); default: the family's own", group="data")
    max_token_length: int | None = _f(None, "CLIP tokens a caption may use: 150 or 225 encode it in 75-token chunks "
                                      "as A1111 does (BOS/EOS around each, hidden states side by side in sequence); "
                                      "default 75 (one chunk)", group="data", choices=(75, 150, 225))
    # ---- end of the issue 20 block
    # captions
    trigger: str | None = _f(None, "replaces {trigger} in captions and is put first in captions lacking it "
                             "(default: --prompt)")
    caption_dropout: float = _f(0.0, "probability of training a step on the empty prompt")
    shuffle_tags: bool = _f(False, "shuffle the comma-separated tags of captions every step")
    keep_tags: int = _f(1, "with --shuffle-tags, keep the first N tags in place")
    # prior preservation
    class_prompt: str | None = _f(None, "class prompt for prior preservation, e.g. 'a photo of a dog'")
    class_images: str | None = _f(None, "folder of class images "
                                  "(default with --class-prompt: <output_dir>/class_images/<prompt>)")
    num_class_images: int = _f(100, "with --class-prompt, generate class images with the base model until the class "
                               "folder holds this many")
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss")
    # images
    resolution: str | int | None = _f(None, "training resolution in pixels, or several separated by commas "
                                     "(512,768,1024: each image trains at every size, with its own buckets and "
                                     "cached latents per size; sample grids use the largest); default: the model's "
                                     "native size", metavar="PX[,PX..]")
    buckets: bool = _f(False, "aspect-ratio bucketing: train each image near its own aspect ratio at "
                       "~resolution² pixels")
    no_flip: bool = _f(False, "disable random horizontal flips")
    repeats: int = _f(1, "times each instance image appears per epoch")
    # budget and optimisation
    steps: int = _f(500, "optimizer steps (ignored when --epochs is set)")
    epochs: int | None = _f(None, "train for this many epochs instead of --steps")
    batch_size: int = _f(1, "instance images per step and device (class images are added on top)")
    grad_accum: int = _f(1, "gradient accumulation steps per optimizer step")
    lr: float = _f(1e-4, "UNet learning rate (prodigy: 1.0, it finds the rate itself)")
    te_lr: float | None = _f(None, "text-encoder learning rate (default: --lr)")
    # ---- pivotal tuning (issue 21, sdlora/train/pivotal.py): new tokens for the trigger, learnt with the LoRA
    pivotal: int = _f(0, "pivotal tuning: learn N new token vectors per CLIP text encoder for --trigger (one new "
                      "word; T5-XXL keeps reading the plain word), saved in the LoRA file (A1111's bundle_emb) and as "
                      "an embedding file beside it; 0: off")
    pivotal_init: str | None = _f(None, "word(s) the new tokens start from, e.g. 'dog' (default: --class-prompt); "
                                  "with fewer tokens than N they repeat, with more the last N are used")
    pivotal_lr: float = _f(3e-4, "learning rate of the new token vectors (no weight decay)")
    pivotal_steps: int = _f(0, "train only the new tokens for the first N steps, then only the LoRA (the tokens "
                            "frozen); 0: both together for the whole run")
    # ---- end of the pivotal block
    lr_scheduler: str = _f("constant", "learning-rate schedule after warmup", choices=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(1e-2, "weight decay (decoupled, as AdamW's)")
    optimizer: str = _f("adamw", "optimizer: " + "; ".join(f"{k}: {v[1]}" for k, v in optim.OPTIMIZERS.items()),
                        choices=optim.NAMES)
    optimizer_args: str | None = _f(None, "optimizer settings as key=value pairs, e.g. 'betas=(0.9,0.99), "
                                    "d_coef=2'; unknown keys are refused, naming the ones the optimizer takes",
                                    metavar="'K=V, ..'")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    min_snr_gamma: float | None = _f(None, "min-SNR-γ loss weighting (5 is the paper's value); off by default")
    noise_offset: float = _f(0.0, "noise offset (e.g. 0.05) for darker darks and brighter brights")
    # ---- noise and loss (issue 20, part 7): kohya's flags and meanings
    loss: str = _f("l2", "the loss between prediction and target: l2 (squared error), huber (pseudo-Huber "
                   "2c(sqrt(d²+c²)-c): quadratic below c, linear above, less pulled by outliers) or smooth_l1 "
                   "(the same divided by c); kohya's --loss_type", choices=LOSSES, group="training")
    huber_c: float = _f(0.1, "--loss huber/smooth_l1: the threshold c (with --huber-schedule snr/exponential, c at "
                        "the noisiest step: in (0, 1])", group="training", metavar="C")
    huber_schedule: str = _f("snr", "--loss huber/smooth_l1: how c follows the noise level (kohya's): constant (c × "
                             "--huber-scale), exponential (--huber-scale × c^(t/T): scale at t=0, c×scale at t=T), "
                             "snr ((1-c)/(1+nsr)² + c, nsr the noise-to-signal ratio: 1 for clean steps, c for "
                             "noisy ones)", choices=HUBER_SCHEDULES, group="training")
    huber_scale: float = _f(1.0, "--loss huber/smooth_l1: scale of c in the constant and exponential schedules",
                            group="training")
    zero_terminal_snr: bool = _f(False, "rescale the noise schedule so that its last step is pure noise (Lin et al. "
                                 "2023, diffusers' rescale_betas_zero_snr); needs a v-prediction model (SD 2.x-v)",
                                 group="training")
    debiased_estimation: bool = _f(False, "weight each sample's loss by 1/sqrt(SNR) for ε-prediction, 1/(SNR+1) "
                                   "for v-prediction, SNR capped at 1000 (kohya's --debiased_estimation_loss); "
                                   "ε/v models only", group="training")
    multires_noise_iterations: int = _f(0, "multi-resolution (pyramid) noise: add N levels of upsampled coarse noise "
                                        "(6-10 usual); 0: off", group="training")
    multires_noise_discount: float = _f(0.3, "multires noise: level i is weighted discount^i, in (0, 1]",
                                        group="training")
    ip_noise_gamma: float = _f(0.0, "input perturbation (Ning et al. 2023): the model's input is noised with "
                               "noise + γ·ξ while the target keeps the noise (0.1 usual); 0: off",
                               group="training", metavar="GAMMA")
    timestep_sampling: str | None = _f(None, "SD 3.x / FLUX.1: how σ is drawn: uniform; sigmoid (sigmoid of a normal "
                                       "with std --sigmoid-scale); logit-normal (the same, shifted by the model's "
                                       "own schedule: SD 3.x shift 3, FLUX.1-dev by image size; the default); shift "
                                       "(sigmoid, shifted by --discrete-flow-shift); flux-shift (sigmoid, shifted "
                                       "by image size as FLUX.1's schedule)", choices=TIMESTEP_SAMPLINGS,
                                       group="training")
    sigmoid_scale: float = _f(1.0, "SD 3.x / FLUX.1: std of the normal behind sigmoid, logit-normal, shift and "
                              "flux-shift sampling (larger: flatter)", group="training")
    discrete_flow_shift: float | None = _f(None, "SD 3.x / FLUX.1 with --timestep-sampling shift: k in σ' = kσ/(1 + "
                                           "(k-1)σ), 3 when not given; above 1 favours noisy steps", group="training",
                                           metavar="S")
    mixed_precision: str = _f("no", "mixed precision for the frozen base", choices=MIXED_PRECISION)
    base_precision: str | None = _f(None, "storage precision of the frozen denoiser's Linear layers, computing in "
                                    "--mixed-precision's dtype: fp8 (float8 e4m3, 1 byte a weight), int8 or nf4 "
                                    "(bitsandbytes, 1 and ~0.52 bytes), or bf16/fp16/fp32; LoRA stays fp32 and the "
                                    "file loads onto the full-precision model (default: the compute dtype)",
                                    choices=BASE_PRECISIONS, group="model")
    te_precision: str | None = _f(None, "storage precision of the frozen text encoders (T5-XXL above all), as "
                                  "--base-precision; a text encoder that trains keeps its precision (said at start)",
                                  choices=BASE_PRECISIONS, group="model")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet and text encoder (on by itself "
                                      "when --base-precision is fp8/int8/nf4: see --no-gradient-checkpointing)")
    no_gradient_checkpointing: bool = _f(False, "keep every activation for the backward even with a quantised base "
                                         "(--base-precision fp8/int8/nf4 turns gradient checkpointing on: whoever "
                                         "stores the base narrower is short of memory, and FLUX.1's activations "
                                         "outweigh its nf4 weights at 1024 px)")
    compile: bool = _f(False, "torch.compile the denoiser (and the text encoders when they train) with accelerate's "
                       "dynamo plugin, inductor: a slow first step while it compiles, then faster ones; on CPU it "
                       "needs a C++ compiler (g++)")
    compile_backend: str = _f("inductor", "the torch.compile backend of --compile: inductor (generated kernels, the "
                              "fast one) or aot_eager (graph capture and AOTAutograd without code generation: for "
                              "checking that a model compiles, in seconds)", choices=("inductor", "aot_eager"))
    attention: str = _f("sdpa", "attention of the denoiser (default: sdpa): "
                        + "; ".join(f"{k}: {v}" for k, v in ATTENTION.items()),
                        choices=tuple(ATTENTION))
    channels_last: bool = _f(False, "keep the UNet's conv weights channels-last (NHWC): helps fp16/bf16 on tensor-core "
                             "GPUs, usually slows CPU training (benchmarks/bench_train.py)")
    # ---- memory for big models (issue 23): block swap and the planner (sdlora/train/swap.py, sdlora/plan.py)
    blocks_to_swap: int = _f(0, "keep N transformer blocks of the denoiser in host memory, each copied to the GPU "
                             "for its forward and backward (kohya's --blocks_to_swap; FLUX.1: N // 2 double + the rest "
                             "x2 single blocks, at most 38; SD 3.x: N joint blocks); 0: off", group="model")
    vram: float | None = _f(None, "GPU memory to fit in, GB: choose base/text-encoder precision, block swap and "
                            "gradient checkpointing for it and print the plan with its byte counts "
                            "(`sdlora plan` prints it without training)", group="model", metavar="GB")
    # ---- end of the big-model block
    # ---- training controls (issue 20): continue, mask, validate, average (sdlora/train/init_lora.py, ema.py,
    # validation.py; sdlora/data/masks.py)
    init_lora: str | None = _f(None, "start from this adapter instead of fresh LoRA layers (a file or PEFT folder "
                               "sdlora reads: kohya, diffusers, PEFT, LyCORIS) of the same family, --network kind "
                               "and rank; its name and sha256 go into the metadata (kohya's --network_weights)",
                               metavar="FILE|FOLDER")
    masks: str | None = _f(None, "folder of greyscale masks, one per training image with the same file stem (white: "
                           "learn, black: ignore, grey: in between): the loss of each latent pixel is weighted by the "
                           "mask, resized, cropped and flipped with its image (kohya's --masked_loss)", metavar="DIR")
    alpha_mask: bool = _f(False, "use each training image's alpha channel as its mask, as --masks does (images "
                          "without alpha learn everywhere; kohya's --alpha_mask)")
    validation_split: float = _f(0.0, "hold this share of the instance images out of training (at least one, chosen "
                                 "by --seed) and report the loss on them at fixed noise and timesteps", metavar="F")
    validation_images: str | None = _f(None, "folder of held-out images (captions beside them, as --images) for the "
                                       "validation loss, instead of --validation-split", metavar="DIR")
    validate_every: int = _f(0, "with a validation set: the validation loss every N steps (also before the first "
                             "and after the last), logged and plotted; the best step's adapter is kept as "
                             "<output>-best.safetensors; 0: before and after training only")
    ema: float | None = _f(None, "keep an exponential moving average of the LoRA weights with this decay (e.g. "
                           "0.99; warm-up (1+n)/(10+n) as diffusers' EMAModel) and save it as "
                           "<output>-ema.safetensors beside the raw file", metavar="DECAY")
    ema_update_every: int = _f(1, "with --ema: update the average every N optimizer steps")
    # ---- end of the training controls
    no_eval_loss: bool = _f(False, "skip the loss on fixed noise printed at the end (2 images × 2 timesteps: 4 "
                            "denoiser forwards before and 4 after training)")
    seed: int = _f(0, "random seed: same seed, data and flags give the same adapter on CPU")
    # caching
    cache_dir: str | None = _f(None, "latent/text-embedding cache folder (default: ~/.cache/sdlora or $SDLORA_CACHE)")
    no_cache: bool = _f(False, "keep the latent/text caches in memory only (nothing written to disk)")
    # monitoring and saving
    sample_every: int = _f(0, "every N steps save a fixed-seed sample grid (trigger, class, unrelated prompt); 0: off")
    sample_prompts: str | None = _f(None, "prompts of the sample grid, separated by ';' "
                                    "(default: trigger, class, unrelated)")
    sample_steps: int = _f(20, "denoising steps of sample images")
    tensorboard: bool = _f(False, "log loss, learning rate and sample grids to TensorBoard (<output>-logs/); the "
                           "same as --log-with tensorboard")
    log_with: str | None = _f(None, "where loss, learning rate, sampled timesteps and sample grids are logged: "
                              "tensorboard (<output>-logs/), wandb (Weights & Biases, `pip install wandb`; "
                              "WANDB_MODE=offline keeps it local) or all", choices=LOG_WITH, group="monitoring")
    progress_file: str | None = _f(None, "append the run's progress to FILE as JSON lines (start, each step's loss "
                                   "and learning rate, each sample grid written), for a program watching the run "
                                   "(app.py's Train tab)", group="monitoring", metavar="FILE")
    save_every: int = _f(0, "every N steps write a checkpoint to resume from (and its adapter); 0: off")
    keep_last: int = _f(3, "checkpoints to keep (older ones are deleted); 0 keeps all")
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'latest'")
    save_precision: str = _f("fp32", "dtype of the saved tensors", choices=SAVE_PRECISION)
    skip_bad_images: bool = _f(False, "skip unreadable images with a warning instead of stopping")
    overwrite: bool = _f(False, "replace what an earlier run left at the output path (adapter, loss curve, "
                         "checkpoints, samples) or a file that is not a sdlora adapter; without it they are kept")
    force_resolution: bool = _f(False, f"allow --resolution above {MAX_RESOLUTION} "
                                "(memory and cache grow with its square)")

    @property
    def checkpointing(self) -> bool:
        """Whether the run uses gradient checkpointing: asked for, or (unless --no-gradient-checkpointing) the base
        is stored at a quantised precision."""
        if self.no_gradient_checkpointing:
            return False
        return self.gradient_checkpointing or self.base_precision in QUANTISED

    def __post_init__(self):
        def bad(flag, why):
            raise SdloraError(f"--{flag.replace('_', '-')} {why}")

        # types first (a TOML file can hold anything): `buckets = "false"` must not turn buckets on
        self.resolution = _sizes(self.resolution, bad)
        for name, t in typing.get_type_hints(TrainConfig).items():
            v = getattr(self, name)
            args = typing.get_args(t)
            if v is None and type(None) in args:
                continue
            if any(isinstance(v, a) and not (a is int and isinstance(v, bool)) for a in args[1:]):
                continue  # a second type of a union (--resolution: one size or a list)
            t = next((a for a in args if a is not type(None)), t)
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
            elif not isinstance(v, t) or (t is int and isinstance(v, bool)):
                what = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[t]
                bad(name, f"must be {what}, got {v!r}")
        if not self.images:
            bad("images", "is required")
        from sdlora.data.kohya_folders import is_concept_parent  # the folders name their prompts: kohya's N_words

        if not self.prompt and not is_concept_parent(Path(self.images)):
            bad("prompt", "is required (the prompt of images without a caption file), unless --images is a parent "
                "of kohya-style N_words subfolders, e.g. '10_sks dog'")
        # every number finite: NaN passes `x > 0`-style checks and inf passes `x >= 0`
        for name, t in typing.get_type_hints(TrainConfig).items():
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                bad(name, f"must be a finite number, got {v}")
        if self.rank < 1:
            bad("rank", f"must be at least 1, got {self.rank}")
        if self.rank > MAX_RANK:
            bad("rank", f"must be at most {MAX_RANK}, got {self.rank} (a file of that rank is mostly redundant)")
        if self.gradient_checkpointing and self.no_gradient_checkpointing:
            bad("no_gradient_checkpointing", "contradicts --gradient-checkpointing; give one of them")
        if self.dora and self.base_precision in QUANTISED:
            bad("dora", f"needs the base weights in a float dtype (DoRA normalises them); drop --dora or use "
                f"--base-precision bf16, not {self.base_precision}")
        if self.dora and self.network not in kinds.DORA_BASES:
            bad("dora", f"applies to --network {' or '.join(kinds.DORA_BASES)}, not {self.network}")
        if self.conv_rank is not None and not 1 <= self.conv_rank <= MAX_RANK:
            bad("conv_rank", f"must be between 1 and {MAX_RANK}, got {self.conv_rank}")
        if self.conv_alpha is not None and self.conv_alpha <= 0:
            bad("conv_alpha", f"must be positive, got {self.conv_alpha}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            bad("lokr_factor", f"must be -1 (most square) or a positive size, got {self.lokr_factor}")
        if self.alpha is not None and self.alpha <= 0:
            bad("alpha", f"must be positive, got {self.alpha}")
        for f in ("steps", "batch_size", "grad_accum", "sample_steps"):
            if getattr(self, f) < 1:
                bad(f, f"must be at least 1, got {getattr(self, f)}")
        for f in ("lr",) + (("te_lr",) if self.te_lr is not None else ()):
            if not getattr(self, f) > 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if not 0 <= self.seed < MAX_SEED:
            bad("seed", f"must be in [0, 2**32) = [0, {MAX_SEED - 1}], got {self.seed}")
        if self.warmup_steps < 0 or (self.epochs is None and self.warmup_steps > self.steps):
            bad("warmup_steps", f"must be between 0 and --steps ({self.steps}), got {self.warmup_steps}")
        for r in self.resolutions or ():
            if r < 8 or r % 8:
                bad("resolution", f"must be a positive multiple of 8, got {r}")
            if r > MAX_RESOLUTION and not self.force_resolution:
                bad("resolution", f"must be at most {MAX_RESOLUTION}, got {r}; pass --force-resolution "
                    "to go above (memory and the latent cache grow with its square)")
        if self.name is not None and (not self.name.strip() or self.name in (".", "..")
                                      or any(c in self.name for c in "/\\\0") or Path(self.name).is_absolute()):
            bad("name", f"{self.name!r} must be a file name, not a path (the adapter is written as "
                "<output-dir>/<name>.safetensors); use --output-dir for the folder, or --out for a whole path")
        if self.class_images and not self.class_prompt and not is_concept_parent(Path(self.class_images)):
            raise SdloraError("--class-images needs --class-prompt (the prompt those class images show)")
        if self.epochs is not None and self.epochs < 1:
            bad("epochs", f"must be at least 1, got {self.epochs}")
        if self.t5xxl_max_token_length is not None and not 1 <= self.t5xxl_max_token_length <= 512:
            bad("t5xxl_max_token_length", f"must be between 1 and 512, got {self.t5xxl_max_token_length}")
        if self.repeats < 1:
            bad("repeats", f"must be at least 1, got {self.repeats}")
        self._check_bounds()
        if not 0 <= self.caption_dropout < 1:
            bad("caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            bad("min_snr_gamma", f"must be positive, got {self.min_snr_gamma}")
        for f in ("sample_every", "save_every", "keep_last", "noise_offset", "prior_loss_weight", "num_class_images",
                  "keep_tags", "weight_decay", "max_grad_norm"):
            if getattr(self, f) < 0:
                bad(f, f"must be >= 0, got {getattr(self, f)}")
        if self.blocks_to_swap < 0:
            bad("blocks_to_swap", f"must be >= 0, got {self.blocks_to_swap}")
        if self.vram is not None and not 0 < self.vram <= 4096:
            bad("vram", f"must be the GPU's memory in GB (e.g. 12), got {self.vram:g}")
        if self.blocks_to_swap and self.compile:
            bad("blocks_to_swap", "cannot be combined with --compile (the swap replaces weights between blocks, "
                "which a compiled graph does not see); drop one of them")
        self._check_pivotal()
        self._check_controls(bad)
        option_checks.check(self, bad)  # the issue-20 options
        optim.parse_args(self.optimizer, self.optimizer_args)  # typed and known keys, refused in one line if not
        self._check_recipe(bad)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices and getattr(self, f.name) is not None:
                bad(f.name, f"must be one of {', '.join(map(str, choices))}, got {getattr(self, f.name)!r}")

    def _check_recipe(self, bad) -> None:
        """The noise and loss options (issue 20) and --log-with; what a model family cannot train is refused once
        the model is known (sdlora/train/recipe.py)."""
        if not 0 < self.huber_c <= (1 if self.huber_schedule != "constant" else math.inf):
            bad("huber_c", f"must be in (0, 1] with --huber-schedule {self.huber_schedule} (c at the noisiest step), "
                f"got {self.huber_c:g}")
        if self.huber_scale <= 0:
            bad("huber_scale", f"must be positive, got {self.huber_scale:g}")
        if self.loss == "l2":
            for f, default in (("huber_c", 0.1), ("huber_schedule", "snr"), ("huber_scale", 1.0)):
                if getattr(self, f) != default:
                    bad(f, "applies to --loss huber or smooth_l1; add --loss huber or drop it")
        if not 0 <= self.multires_noise_iterations <= 20:
            bad("multires_noise_iterations", f"must be between 0 (off) and 20, got {self.multires_noise_iterations}")
        if not 0 < self.multires_noise_discount <= 1:
            bad("multires_noise_discount", f"must be in (0, 1], got {self.multires_noise_discount:g}")
        if self.multires_noise_discount != 0.3 and not self.multires_noise_iterations:
            bad("multires_noise_discount", "has no effect without --multires-noise-iterations N; add it or drop this")
        if not 0 <= self.ip_noise_gamma <= 1:
            bad("ip_noise_gamma", f"must be between 0 (off) and 1 (0.1 is usual), got {self.ip_noise_gamma:g}")
        if not 0 < self.sigmoid_scale <= 100:
            bad("sigmoid_scale", f"must be in (0, 100], got {self.sigmoid_scale:g}")
        if self.sigmoid_scale != 1 and self.timestep_sampling == "uniform":
            bad("sigmoid_scale", "has no effect with --timestep-sampling uniform; drop one of them")
        if self.discrete_flow_shift is not None and not 0 < self.discrete_flow_shift <= 100:
            bad("discrete_flow_shift", f"must be in (0, 100], got {self.discrete_flow_shift:g}")
        if self.discrete_flow_shift is not None and self.timestep_sampling != "shift":
            bad("discrete_flow_shift", "applies to --timestep-sampling shift; add it or drop --discrete-flow-shift")
        if self.tensorboard and self.log_with == "wandb":
            self.log_with = "all"  # --tensorboard is --log-with tensorboard, on top of wandb
        self.log_with = self.log_with or ("tensorboard" if self.tensorboard else None)
        self.tensorboard = self.log_with in ("tensorboard", "all")
        if self.log_with in ("wandb", "all"):
            import importlib.util
            import sys

            if sys.modules.get("wandb", ...) is None or ("wandb" not in sys.modules
                                                         and importlib.util.find_spec("wandb") is None):
                bad("log_with", f"{self.log_with} needs Weights & Biases: pip install wandb (or use --log-with "
                    "tensorboard)")

    @property
    def resolutions(self) -> tuple[int, ...] | None:
        """The training sizes (--resolution 512,768: two), ascending; None: the model's native size."""
        if self.resolution is None:
            return None
        return (self.resolution,) if isinstance(self.resolution, int) else tuple(map(int, self.resolution.split(",")))

    @property
    def max_resolution(self) -> int | None:
        """The largest training size (memory plans, sample grids), None: the model's native size."""
        return max(self.resolutions) if self.resolutions else None

    def _check_pivotal(self) -> None:
        """--pivotal and its options (the trigger against the tokenizer is checked once the model is loaded)."""
        if not self.pivotal:
            if self.pivotal < 0:
                raise SdloraError(f"--pivotal must be >= 0, got {self.pivotal}")
            for f in ("pivotal_init",):
                if getattr(self, f) is not None:
                    raise SdloraError(f"--{f.replace('_', '-')} needs --pivotal N")
            if self.pivotal_steps:
                raise SdloraError("--pivotal-steps needs --pivotal N")
            return
        from sdlora.formats.embeddings import check_name

        if not 1 <= self.pivotal <= 64:
            raise SdloraError(f"--pivotal must be between 1 and 64 tokens, got {self.pivotal}")
        if not self.trigger:
            raise SdloraError("--pivotal needs --trigger WORD: the new word the tokens are learnt for (it names the "
                              "embedding), e.g. --prompt 'a photo of ohwx dog' --trigger ohwx")
        check_name(self.trigger)
        if not (self.pivotal_init or self.class_prompt):
            raise SdloraError("--pivotal needs --pivotal-init WORD (what the subject is, e.g. 'dog') or "
                              "--class-prompt to start the new tokens from")
        if self.pivotal_init is not None and not self.pivotal_init.strip():
            raise SdloraError("--pivotal-init must be a word, e.g. 'dog'")
        if not self.pivotal_lr > 0:
            raise SdloraError(f"--pivotal-lr must be positive, got {self.pivotal_lr}")
        if self.pivotal_steps and self.optimizer == "schedulefree":
            raise SdloraError("--pivotal-steps gates learning rates to 0, which schedule-free AdamW's averaging "
                              "divides by; use --optimizer adamw, or drop --pivotal-steps")
        if self.pivotal_steps < 0 or (self.epochs is None and self.pivotal_steps >= self.steps):
            raise SdloraError(f"--pivotal-steps must be between 0 and --steps - 1 ({self.steps - 1}), got "
                              f"{self.pivotal_steps}: the LoRA trains after them")

    def _check_controls(self, bad) -> None:
        """--init-lora, --masks/--alpha-mask, validation and --ema: ranges and combinations that cannot work."""
        if self.masks and self.alpha_mask:
            bad("alpha_mask", "contradicts --masks (both give each image's mask); give one of them")
        if not 0 <= self.validation_split < 1:
            bad("validation_split", f"must be in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_images:
            bad("validation_split", "contradicts --validation-images (both give the held-out images); give one")
        if self.validate_every < 0:
            bad("validate_every", f"must be >= 0, got {self.validate_every}")
        if self.validate_every and not (self.validation_split or self.validation_images):
            bad("validate_every", "needs a validation set: --validation-split F or --validation-images DIR")
        if self.ema is not None and not 0 < self.ema < 1:
            bad("ema", f"must be a decay in (0, 1), e.g. 0.99, got {self.ema}")
        if self.ema_update_every < 1:
            bad("ema_update_every", f"must be at least 1, got {self.ema_update_every}")
        if self.ema_update_every != 1 and self.ema is None:
            bad("ema_update_every", "needs --ema DECAY")
        for flag in ("init_lora", "masks", "validation_images"):
            if getattr(self, flag) is not None and not str(getattr(self, flag)).strip():
                bad(flag, "is empty; give a path")

    def _check_bounds(self) -> None:
        """Counts that size the run's work and memory (sdlora/bounds.py)."""
        from sdlora import bounds as B

        B.at_most("--repeats", self.repeats, B.MAX_REPEATS, "each image is seen that many times per epoch: use "
                  "--steps or --epochs for a longer run")
        B.at_most("--steps", self.steps, B.MAX_STEPS, "a LoRA trains in a few thousand steps")
        if self.epochs is not None:
            B.at_most("--epochs", self.epochs, B.MAX_EPOCHS, "train for fewer epochs")
        B.at_most("--sample-steps", self.sample_steps, B.MAX_SAMPLE_STEPS, "20-50 steps are usual")
        B.at_most("--num-class-images", self.num_class_images, B.MAX_CLASS_IMAGES, "a few hundred are usual")

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def optimizer_kwargs(self) -> dict:
        return optim.parse_args(self.optimizer, self.optimizer_args)

    @property
    def trigger_text(self) -> str:
        return self.trigger or self.prompt or ""

    @property
    def class_folder(self) -> Path | None:
        if self.class_images:  # a kohya-style parent needs no --class-prompt
            return Path(self.class_images)
        if not self.class_prompt:
            return None
        from sdlora.train.prior import slug

        return Path(self.output_dir) / "class_images" / slug(self.class_prompt)

    @property
    def output_path(self) -> Path:
        if self.out:
            return Path(self.out)
        name = self.name or Path(self.images).resolve().name or "lora"
        return Path(self.output_dir) / f"{name}.safetensors"

    def to_dict(self) -> dict:
        return asdict(self)


def _sizes(value, bad):
    """--resolution as given: one size (an int, from a flag or TOML) or sizes separated by commas, kept as
    "512,768,1024" (ascending; one size becomes an int)."""
    if not isinstance(value, str):
        return value
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        bad("resolution", f"must be a size in pixels or sizes separated by commas (e.g. 512,768,1024), got {value!r}")
    sizes = sorted(int(p) for p in parts)
    if len(set(sizes)) < len(sizes):
        bad("resolution", f"lists a size twice ({value}); give each size once")
    return sizes[0] if len(sizes) == 1 else ",".join(map(str, sizes))


def load_toml(path: str | Path) -> dict:
    """Settings from a TOML file; unknown keys are an error (a typo must not pass silently)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SdloraError(f"--config {path}: no such file") from e
    except IsADirectoryError as e:
        raise SdloraError(f"--config {path}: is a folder; pass a .toml file (presets are in configs/)") from e
    except UnicodeDecodeError as e:
        raise SdloraError(f"--config {path}: not a text file (byte {e.start} is not UTF-8); pass a UTF-8 .toml "
                          "settings file") from e
    except OSError as e:
        raise SdloraError(f"--config {path}: cannot read it ({e.strerror or e}); check the path and permissions") from e
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"--config {path}: invalid TOML ({e}); fix that line") from e
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SdloraError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; see `sdlora train --help`")
    return data


def make_config(values: dict) -> TrainConfig:
    """A validated TrainConfig; type errors become one-line errors."""
    known = {f.name: f for f in fields(TrainConfig)}
    missing = [n for n, f in known.items() if f.default is MISSING and n not in values]
    if missing:
        raise SdloraError(f"--{missing[0].replace('_', '-')} is required")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise SdloraError(f"invalid settings: {e}") from e
