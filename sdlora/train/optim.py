"""The optimizers `--optimizer` names, their `--optimizer-args`, and the one place they are built.

Light at import (no torch): `sdlora.config` validates `--optimizer-args` with `parse_args` before anything heavy
loads. `build` imports the optimizer's package only when a run needs it.

Every optimizer here keeps its state as tensors, numbers and (bitsandbytes) one nested dict of tensors, which
`ckpt.save` writes as safetensors + JSON, so each one resumes bit for bit.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from sdlora.errors import SdloraError, cause

FLOATS = "floats"  # a tuple of floats, written (0.9,0.999)

# name -> (package to install, what it is, {argument: type}). --lr and --weight-decay are passed as themselves.
OPTIMIZERS: dict[str, tuple[str | None, str, dict[str, object]]] = {
    "adamw": (None, "torch AdamW (fp32 state: 2 values per LoRA weight)",
              {"betas": FLOATS, "eps": float, "amsgrad": bool, "foreach": bool}),
    "adamw8bit": ("bitsandbytes", "bitsandbytes 8-bit AdamW (state quantised to 8 bits: ~1/4 of AdamW's)",
                  {"betas": FLOATS, "eps": float, "min_8bit_size": int, "percentile_clipping": int,
                   "block_wise": bool}),
    "prodigy": ("prodigyopt", "Prodigy: finds the learning rate itself (use --lr 1.0)",
                {"betas": FLOATS, "beta3": float, "eps": float, "decouple": bool, "use_bias_correction": bool,
                 "safeguard_warmup": bool, "d0": float, "d_coef": float, "growth_rate": float}),
    "adafactor": ("transformers", "transformers' Adafactor (factored second moments: least state)",
                  {"scale_parameter": bool, "relative_step": bool, "warmup_init": bool, "beta1": float,
                   "decay_rate": float, "clip_threshold": float}),
    "schedulefree": ("schedulefree", "schedule-free AdamW (no LR schedule needed; its own warmup_steps)",
                     {"betas": FLOATS, "eps": float, "warmup_steps": int, "r": float, "weight_lr_power": float}),
}
NAMES = tuple(OPTIMIZERS)

_PAIR = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(\([^)]*\)|[^,\s]+)\s*(?:,|\s|$)")


def _value(name: str, key: str, text: str, t) -> object:
    try:
        if t is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if t is FLOATS:
            items = [s for s in text.strip("()").split(",") if s.strip()]
            return tuple(float(s) for s in items)
        return t(text)
    except ValueError:
        what = {bool: "true or false", int: "a whole number", float: "a number", FLOATS: "numbers like (0.9,0.999)"}[t]
        raise SdloraError(f"--optimizer-args: {key}={text} for {name} must be {what}") from None


def parse_args(name: str, text: str | None) -> dict[str, object]:
    """`key=value` pairs (separated by commas or spaces; tuples in parentheses) as typed values, refusing keys the
    optimizer does not take."""
    if name not in OPTIMIZERS:
        raise SdloraError(f"--optimizer must be one of {', '.join(NAMES)}, got {name!r}")
    allowed = OPTIMIZERS[name][2]
    out: dict[str, object] = {}
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if not m or m.end() == pos:
            raise SdloraError(f"--optimizer-args: cannot read {text[pos:]!r}; write key=value pairs, e.g. "
                              "'betas=(0.9,0.99), eps=1e-8'")
        key, raw = m.group(1), m.group(2)
        if key not in allowed:
            raise SdloraError(f"--optimizer-args: {name} takes no '{key}'; it takes {', '.join(allowed)} "
                              "(--lr and --weight-decay are options of their own)")
        out[key] = _value(name, key, raw, allowed[key])
        pos = m.end()
    return out


def load_package(name: str):
    """The package that provides optimizer `name` (None for torch's AdamW); a one-line SdloraError when it is missing
    or cannot load. Called before the model loads, so a missing package costs no waiting."""
    if name == "adamw":
        return None
    if name == "adamw8bit":
        from sdlora import lazy

        try:
            bitsandbytes = lazy.bitsandbytes()  # also lifts the sdlora command's "not importable" mark (lazy.py)
        except Exception as e:  # ImportError, or a library that fails to find its native kernels
            raise SdloraError(f"--optimizer adamw8bit needs bitsandbytes, which cannot load here ({cause(e, 160)}); "
                              "pip install 'sdlora[optim]', or use --optimizer adafactor for low memory") from e
        return bitsandbytes
    if name == "adafactor":
        import transformers.optimization

        return transformers.optimization
    if name in ("prodigy", "schedulefree"):
        module = {"prodigy": "prodigyopt", "schedulefree": "schedulefree"}[name]
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise SdloraError(f"--optimizer {name} needs the {module} package: pip install 'sdlora[optim]' "
                              f"(or pip install {module})") from e
    raise SdloraError(f"--optimizer must be one of {', '.join(NAMES)}, got {name!r}")


def build(name: str, args: dict, param_groups: list[dict], lr: float, weight_decay: float):
    """The torch optimizer `name` over `param_groups`."""
    pkg = load_package(name)
    if name == "adamw":
        import torch

        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "adamw8bit":
        return pkg.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "prodigy":
        return pkg.Prodigy(param_groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "adafactor":
        args = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | args
        return pkg.Adafactor(param_groups, lr=None if args["relative_step"] else lr, weight_decay=weight_decay,
                             **args)
    return pkg.AdamWScheduleFree(param_groups, lr=lr, weight_decay=weight_decay, **args)


def check_runs(optimizer, device) -> None:
    """bitsandbytes imports on machines where its kernels for `device` are missing (they load per device type): one
    blockwise quantisation, the op its 8-bit state uses, turns that into a one-line error before the first step."""
    inner = unwrap(optimizer)
    if type(inner).__module__.startswith("bitsandbytes"):
        import torch

        try:
            import bitsandbytes.functional as F

            F.quantize_blockwise(torch.zeros(256, device=device))
        except Exception as e:
            raise SdloraError(f"--optimizer adamw8bit: bitsandbytes has no kernels for {device.type} here "
                              f"({cause(e, 160)}); use --optimizer adamw or adafactor") from e


def unwrap(optimizer):
    """The library optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def has_modes(optimizer) -> bool:
    """Schedule-free optimizers hold different weights for training (y) and evaluation/saving (x)."""
    return any("train_mode" in g for g in unwrap(optimizer).param_groups)


def set_mode(optimizer, train: bool) -> None:
    inner = unwrap(optimizer)
    if has_modes(inner):
        inner.train() if train else inner.eval()


@contextmanager
def eval_weights(optimizer):
    """Inside: the parameters hold the weights to evaluate and save. A schedule-free optimizer in training mode is
    switched to eval and back exactly (the training weights are restored from a copy, not recomputed, so that a
    checkpoint or a sample grid does not change the run by a rounding error)."""
    inner = unwrap(optimizer)
    if not has_modes(inner) or not any(g["train_mode"] for g in inner.param_groups):
        yield
        return
    saved = [(p, p.data.clone()) for g in inner.param_groups for p in g["params"]]
    inner.eval()
    try:
        yield
    finally:
        for p, d in saved:
            p.data.copy_(d)
        for g in inner.param_groups:
            g["train_mode"] = True
