"""What trains: LoRA layers added to the denoiser and the text encoders the preset adapts, the frozen weights cast
and placed on the device (block swap keeping some in host memory), then the optimizer and learning-rate schedule
prepared by accelerate. Two phases of `loop.train`, each returning its record."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from sdlora import outputs
from sdlora.archs.spec import DENOISER
from sdlora.config import TrainConfig
from sdlora.errors import SdloraError
from sdlora.lora import dropout
from sdlora.lora.inject import add_lora, format_table, network_of
from sdlora.lora.targets import check_rank, find_targets, refine
from sdlora.train import loraplus, memory, optim, option_checks, pivotal, scale, speed, swap
from sdlora.train.export import file_row
from sdlora.train.prepare import Env, Examples, Model, trained_text_encoders


@dataclass
class Lora:
    """The modules that carry LoRA layers and where: {component: module}, {component: target names}."""
    adapted: dict[str, torch.nn.Module]
    targets: dict[str, list]
    swap: object  # swap.Swapper with --blocks-to-swap, else None
    tokens: object = None  # lora.tokens.Attached: the new tokens of --pivotal, else None

    @property
    def train_te(self) -> bool:
        return any(c != DENOISER for c in self.adapted)

    @property
    def trained(self) -> dict[str, torch.nn.Module]:
        """The modules holding trainable weights: the adapted ones and the text encoders learning new tokens."""
        extra = self.tokens.encoders() if self.tokens else {}
        return self.adapted | {c: m for c, m in extra.items() if c not in self.adapted}


@dataclass
class Optimizing:
    """The optimizer and schedule, and the modules as accelerate prepared them (DDP/FSDP-wrapped when launched)."""
    trainable: list[torch.nn.Parameter]
    optimizer: object
    lr_scheduler: object
    denoiser: torch.nn.Module
    tes: dict[str, torch.nn.Module]  # component -> text encoder, prepared when it trains
    text_encoders: list[tuple]  # (tokenizer, prepared text encoder), as step.encode_text takes them


def add_lora_layers(cfg: TrainConfig, env: Env, model: Model, data: Examples, plan: outputs.Planned) -> Lora:
    base, say, device = model.base, env.say, env.device
    denoiser = base.denoiser
    adapted = {DENOISER: denoiser} | trained_text_encoders(cfg, model)
    targets = {c: find_targets(m, c, cfg.preset, base.spec) for c, m in adapted.items()}
    if cfg.targets or cfg.exclude:  # regexes beyond the preset; a text encoder left with nothing is not trained
        targets = refine(adapted, targets, option_checks.regexes(cfg.targets), option_checks.regexes(cfg.exclude))
        if not targets[DENOISER]:
            raise SdloraError(f"--exclude leaves the {base.spec.denoiser} no module to adapt; exclude fewer")
        adapted = {c: m for c, m in adapted.items() if targets[c]}
        targets = {c: targets[c] for c in adapted}
    check_rank(adapted, targets, cfg.rank, base.name)
    for c, m in adapted.items():
        add_lora(m, targets[c], cfg.rank, cfg.network_alpha, network_of(cfg))
    if hooked := dropout.attach(adapted.values(), dropout.of(cfg)):  # kohya's network/rank/module dropout
        say(f"dropout on {hooked} LoRA layers: {dropout.of(cfg)}")
    if env.main:  # estimated bytes written vs free space, before latents are cached and steps run
        outputs.check_space(outputs.estimate_for_run(cfg, plan, adapted, data.instance + data.classes, data.steps,
                                                     model.resolution))
    say(f"model {base.name} ({base.arch}, {base.prediction_type}); preset '{cfg.preset}', rank {cfg.rank}, "
        f"alpha {cfg.network_alpha:g} (scale {cfg.network_alpha / cfg.rank:g})")
    say(format_table([file_row(m, c, base) for c, m in adapted.items()]))
    def dtype_of(p):  # LoRA weights train in fp32, frozen ones compute in the mixed-precision dtype
        return torch.float32 if p.requires_grad else env.weight_dtype

    # --blocks-to-swap: the swapped blocks' frozen weights stay in host memory (cast there), the rest moves
    swapper = swap.enable(base.spec, denoiser, cfg.blocks_to_swap, device, dtype_of)
    for m in ([] if swapper else [denoiser]) + list(model.tes.values()):  # T5-XXL too: frozen, compute dtype
        if memory.released(m):  # its outputs are all cached already (caches.encode_first)
            continue
        # cast and moved one tensor at a time: never the fp32 base on the device, no second copy in memory
        memory.move(m, device, dtype_of)
        m.to(device)  # buffers
    if swapper:
        say(swap.describe(base.spec, denoiser, cfg.blocks_to_swap))
    speed.set_attention(denoiser, cfg.attention, device)
    if cfg.channels_last:
        speed.channels_last(denoiser)
    if cfg.checkpointing:  # asked for, or the base is stored narrower (TrainConfig.checkpointing)
        denoiser.enable_gradient_checkpointing()
        for c, m in adapted.items():
            if c != DENOISER:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Lora(adapted, targets, swapper, pivotal.attach(cfg, model, say))


def prepare_optimizer(cfg: TrainConfig, env: Env, model: Model, lora: Lora, steps: int) -> Optimizing:
    acc, base, tes = env.accelerator, model.base, model.tes
    params = [{"params": [p for p in base.denoiser.parameters() if p.requires_grad], "lr": cfg.lr}]
    tokens = pivotal.param_groups(cfg, lora.tokens)  # --pivotal: the new tokens, a group of their own
    taken = {id(p) for g in tokens for p in g["params"]}
    if lora.train_te:
        params.append({"params": [p for m in tes.values() for p in m.parameters() if p.requires_grad
                                  and id(p) not in taken], "lr": cfg.te_lr or cfg.lr})
    params = loraplus.split_groups(params, lora.adapted.values(), cfg.loraplus_ratio)  # B at R x lr
    if cfg.loraplus_ratio is not None:
        env.say(f"LoRA+ (ratio {cfg.loraplus_ratio:g}): {loraplus.describe(params)}")
    params += tokens
    trainable = [p for g in params for p in g["params"]]
    if env.fsdp:  # the frozen base is sharded, the LoRA weights stay whole on every process
        scale.keep_whole(acc, base.denoiser)
    optimizer = optim.build(cfg.optimizer, cfg.optimizer_kwargs, params, cfg.lr, cfg.weight_decay)
    optim.check_runs(optimizer, acc.device)
    # accelerate steps a prepared scheduler once per process, so its horizon is scaled the same way.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * acc.num_processes,
                                 num_training_steps=steps * acc.num_processes,
                                 **loraplus.scheduler_kwargs(cfg))
    pivotal.split_phases(cfg, lr_scheduler, acc.num_processes)  # --pivotal-steps: tokens first, then the LoRA
    # with block swap the denoiser is placed already (swapped weights in host memory): accelerate must not move it
    denoiser_p, optimizer, lr_scheduler = acc.prepare(base.denoiser, optimizer, lr_scheduler,
                                                      device_placement=[not lora.swap, None, None])
    # a module without trainable parameters must not be DDP-wrapped
    tes_p = {c: acc.prepare(m) if c in lora.trained else m for c, m in tes.items()}
    text_encoders_p = [(tok, tes_p[c]) for c, (tok, _) in base.text_encoders.items()]
    on_device = [m for m in base.modules.values() if next(m.parameters()).device == acc.device]
    env.say(memory.estimate(on_device, trainable, memory.STATE_BYTES[cfg.optimizer]))
    return Optimizing(trainable, optimizer, lr_scheduler, denoiser_p, tes_p, text_encoders_p)
