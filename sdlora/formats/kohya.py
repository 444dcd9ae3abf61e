"""kohya LoRA key names and tensors (shared/KOHYA_FORMAT.md). Pure functions on names and dicts.

Only this module knows key names. A module `<path>` of component `c` becomes `<prefix>_<path with . -> _>`
with three tensors: `.lora_down.weight` [r, in(, 1, 1)], `.lora_up.weight` [out, r(, 1, 1)] and a 0-dim `.alpha`.
"""

from __future__ import annotations

import torch

# component -> key prefix, for SD 1.x (single text encoder: `lora_te`, never `lora_te1`, which kohya rejects).
PREFIX = {"unet": "lora_unet", "te": "lora_te"}
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def kohya_name(component: str, module_name: str) -> str:
    """kohya module name of `module_name` (a diffusers/transformers module path) in `component`.

    transformers 5.x's CLIPTextModel has no `text_model` submodule; the canonical names every loader matches
    keep it (`lora_te_text_model_encoder_layers_0_...`), so it is added here when missing.
    """
    if component == "te" and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return PREFIX[component] + "_" + module_name.replace(".", "_")


def module_of_key(key: str) -> tuple[str, str]:
    """Split a kohya tensor key into (kohya module name, suffix)."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise KeyError(key)


def name_table(modules: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, model module name), for the module names of a loaded model."""
    return {kohya_name(c, n): (c, n) for c, names in modules.items() for n in names}


def pack(component: str, module_name: str, down: torch.Tensor, up: torch.Tensor, alpha: float,
         conv: bool = False) -> dict[str, torch.Tensor]:
    """The three kohya tensors of one module. `down` is [r, in], `up` is [out, r]; 1x1 convs get [.., 1, 1]."""
    if conv:
        down = down.reshape(*down.shape[:2], 1, 1) if down.dim() == 2 else down
        up = up.reshape(*up.shape[:2], 1, 1) if up.dim() == 2 else up
    k = kohya_name(component, module_name)
    return {
        f"{k}.lora_down.weight": down.detach().contiguous(),
        f"{k}.lora_up.weight": up.detach().contiguous(),
        f"{k}.alpha": torch.tensor(float(alpha), dtype=down.dtype),
    }


def group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module: {kohya module name: {"lora_down.weight": .., "lora_up.weight": .., "alpha": ..}}.

    Keys that are not kohya LoRA keys are returned under the module name "" so callers can report them.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        try:
            mod, suffix = module_of_key(key)
        except KeyError:
            out.setdefault("", {})[key] = t
            continue
        out.setdefault(mod, {})[suffix] = t
    return out


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """The weight delta (alpha/r)·up@down, shaped like the base weight (Linear, 1x1 conv or kxk LoCon conv).

    A missing or zero alpha means alpha = r (scale 1), as kohya, ComfyUI and A1111 read it. For a kxk conv
    (down [r, in, k, k], up [out, r, 1, 1]) the delta is kohya's `merge_to`:
    conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), i.e. up applied over down's output channels.
    """
    r = down.shape[0]
    scale = 1.0 if not alpha else float(alpha) / r
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        d = torch.nn.functional.conv2d(down.float().permute(1, 0, 2, 3), up.float()).permute(1, 0, 2, 3)
        return d * scale
    d = up.reshape(up.shape[0], r).float() @ down.reshape(r, -1).float()
    if down.dim() == 4:
        d = d.reshape(up.shape[0], down.shape[1], 1, 1)
    return d * scale
