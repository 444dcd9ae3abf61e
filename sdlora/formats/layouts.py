"""The module names each tool expects, per architecture: kohya's (with shapes), A1111's and ComfyUI's.

Built from the real architectures on the meta device (sdlora/archs) or from a loaded model, never from weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sdlora import archs
from sdlora.formats import kohya


@dataclass(frozen=True)
class Module:
    component: str  # kohya component: "unet", "te", "te1", "te2"
    path: str  # module path in the diffusers / transformers model (text encoders without `text_model.`)
    shape: tuple[int, ...]  # weight shape
    conv: bool  # Conv2d (else Linear)
    module_path: str = field(default="", compare=False)  # its name in the loaded model (`get_submodule`)


def table_of(components: dict[str, torch.nn.Module], arch: str) -> dict[str, Module]:
    """Canonical kohya module name -> Module, for every Linear and Conv2d of `components` ({"unet": .., "te": ..})."""
    out = {}
    for comp, model in components.items():
        for name, m in model.named_modules():
            if ".lora_A." in name or ".lora_B." in name:  # PEFT's own LoRA layers in a model being trained
                continue
            name = name.replace(".base_layer", "")  # PEFT keeps the wrapped layer as `base_layer`
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                path = kohya.te_path(name) if comp in kohya.TE_COMPONENTS else name
                out[kohya.kohya_name(comp, path, arch)] = Module(comp, path, tuple(m.weight.shape),
                                                                 isinstance(m, torch.nn.Conv2d), name)
    return out


@functools.lru_cache(maxsize=4)
def kohya_table(arch: str) -> dict[str, Module]:
    """Canonical kohya module names of the real `arch` ("sd1", "sd2", "sdxl"), built on the meta device."""
    return table_of(archs.meta_components(arch), arch)


def model_table(components: dict[str, torch.nn.Module], arch: str) -> dict[str, Module]:
    """`table_of` plus the non-canonical names loaders also apply (`aliases`): what an adapter is matched against."""
    table = table_of(components, arch)
    return table | {alias: table[c] for alias, c in aliases(table, arch).items()}


def aliases(table: dict[str, Module], arch: str) -> dict[str, str]:
    """Non-canonical names that kohya also loads -> canonical name: UNet modules under diffusers-style names where
    kohya names them by LDM paths (SDXL; kohya converts them, KOHYA_FORMAT.md §1)."""
    if archs.get(arch).denoiser_names != "ldm":
        return {}
    return {"lora_unet_" + m.path.replace(".", "_"): k for k, m in table.items() if m.component == "unet"}


def _te_layers(table: dict[str, Module], component: str) -> int:
    layers = {int(m.path.split(".")[2]) for m in table.values()
              if m.component == component and m.path.startswith("encoder.layers.")}
    return max(layers) + 1 if layers else 0


@functools.lru_cache(maxsize=4)
def a1111_layers(arch: str) -> frozenset[str]:
    """A1111's `network_layer_mapping` names of a checkpoint of `arch` (the modules with weights LoRA can patch)."""
    table = kohya_table(arch)
    names = {"diffusion_model_" + kohya.unet_to_ldm(m.path, arch).replace(".", "_")
             for m in table.values() if m.component == "unet"}
    for t in archs.get(arch).text_encoders:
        if t.ldm_layout == "openclip":
            names |= kohya.openclip_layer_names(_te_layers(table, t.component), t.a1111_prefix)
        else:
            names |= {t.a1111_prefix + "transformer_text_model_" + m.path.replace(".", "_")
                      for m in table.values() if m.component == t.component}
    return frozenset(names)


_COMFY_TE = ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
# ComfyUI's `model_lora_keys_clip`: the (first) CLIP-L encoder answers to lora_te_ and lora_te1_, bigG to lora_te2_
_COMFY_TE_PREFIXES = {"te": ("lora_te", "lora_te1"), "te1": ("lora_te", "lora_te1"), "te2": ("lora_te2",)}


@functools.lru_cache(maxsize=4)
def comfy_keys(arch: str) -> frozenset[str]:
    """kohya module names ComfyUI's `model_lora_keys_unet`/`model_lora_keys_clip` map for `arch`."""
    table = kohya_table(arch)
    keys = set()
    for m in table.values():
        if m.component == "unet":
            keys.add("lora_unet_" + kohya.unet_to_ldm(m.path, arch).replace(".", "_"))
            keys.add("lora_unet_" + m.path.replace(".", "_"))
    for comp in archs.get(arch).te_components:
        for b in range(_te_layers(table, comp)):
            for p in _COMFY_TE_PREFIXES[comp]:
                keys |= {f"{p}_text_model_encoder_layers_{b}_{c}" for c in _COMFY_TE}
    return frozenset(keys)

