"""LoRA+ (Hayou et al. 2024, kohya's `loraplus_lr_ratio`): the up (B) matrices learn at R times the rate of the down
(A) ones. Each optimizer parameter group (the denoiser's, the text encoders') is split in two, as kohya's
`LoRANetwork.prepare_optimizer_params` splits it ("lora" and "plus"); which parameters are B is the adapter kind's
(`KindSpec.up_parameters`). Also the learning-rate schedule's extra arguments of `--lr-scheduler`."""

from __future__ import annotations

from sdlora.lora import kinds


def up_parameter_ids(modules) -> set[int]:
    """ids of the up (B) parameters of every adapter layer in `modules`."""
    return {id(p) for m in modules for spec, layer in kinds.adapter_layers(m).values()
            for p in spec.up_parameters(layer)}


def split_groups(groups: list[dict], modules, ratio: float | None) -> list[dict]:
    """`groups` ({"params", "lr"}) with each group's up parameters moved to a group of their own at lr × `ratio`
    (after it, in the same order); unchanged without a ratio."""
    if ratio is None:
        return groups
    up = up_parameter_ids(modules)
    out = []
    for g in groups:
        a = [p for p in g["params"] if id(p) not in up]
        b = [p for p in g["params"] if id(p) in up]
        out += [g | {"params": a}] if a else []
        out += [g | {"params": b, "lr": g["lr"] * ratio}] if b else []
    return out


def scheduler_kwargs(cfg) -> dict:
    """diffusers `get_scheduler`'s arguments beyond warmup and length: the cycles of cosine_with_restarts, the power
    of polynomial (kohya passes lr_scheduler_num_cycles / lr_scheduler_power the same way)."""
    if cfg.lr_scheduler == "cosine_with_restarts":
        return {"num_cycles": cfg.lr_restarts}
    if cfg.lr_scheduler == "polynomial":
        return {"power": cfg.lr_scheduler_power}
    return {}


def describe(groups: list[dict]) -> str:
    """The learning rate of each group, for the run's log."""
    return ", ".join(f"{sum(p.numel() for p in g['params']):,} params at {g['lr']:.2g}" for g in groups)

