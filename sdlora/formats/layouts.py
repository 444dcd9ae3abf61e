"""The module names each tool expects, per architecture: kohya's (with shapes), A1111's and ComfyUI's.

Built from the real architectures on the meta device (sdlora/archs) or from a loaded model, never from weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from sdlora import archs
from sdlora.archs.spec import DENOISER
from sdlora.formats import dit, kohya
from sdlora.quant import weight_shape  # nf4 packs a Linear's weight: its shape is not [out, in]


@dataclass(frozen=True)
class Module:
    component: str  # kohya component: "unet", "te", "te1", "te2", "te3"
    path: str  # module path in the diffusers / transformers model (text encoders without `text_model.`); for a
    # family kohya names by the original model's tree (SD 3.x, FLUX.1), the original module path
    shape: tuple[int, ...]  # weight shape (of the original module: fused q/k/v rows together)
    conv: bool  # Conv2d (else Linear)
    module_path: str = field(default="", compare=False)  # its name in the loaded model (`get_submodule`)
    # an original module that is several diffusers modules (fused q/k/v) or a row-permuted one: where its rows are,
    # in order, as (diffusers module path, row start, row stop); empty when `module_path` is the whole of it
    parts: tuple[tuple[str, int, int], ...] = field(default=(), compare=False)


class _Plain:
    """A model's Linear/Conv2d modules under their own names, PEFT's wrappers unwrapped (what formats/dit.py reads)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    def named_modules(self):
        return iter(self.modules.items())


def _layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for name, m in model.named_modules():
        if ".lora_A." in name or ".lora_B." in name:  # PEFT's own LoRA layers in a model being trained
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name.replace(".base_layer", "")] = m  # PEFT keeps the wrapped layer as `base_layer`
    return out


def table_of(components: dict[str, torch.nn.Module], arch: str) -> dict[str, Module]:
    """Canonical kohya module name -> Module, for every Linear and Conv2d of `components` ({"unet": .., "te": ..})."""
    out = {}
    for comp, model in components.items():
        layers = _layers(model)
        if comp == DENOISER and archs.get(arch).denoiser_names == "original":
            out |= _original_table(arch, layers)
            continue
        for name, m in layers.items():
            path = kohya.te_path(name) if comp in kohya.TE_COMPONENTS else name
            out[kohya.kohya_name(comp, path, arch)] = Module(comp, path, weight_shape(m),
                                                             isinstance(m, torch.nn.Conv2d), name)
    return out


def _shape(m: torch.nn.Module) -> tuple[int, ...]:
    """A layer's logical weight shape: a Linear's (out, in) even when its weight is stored packed (nf4)."""
    if isinstance(m, torch.nn.Linear):
        return (m.out_features, m.in_features)
    return tuple(m.weight.shape)


def _original_table(arch: str, layers: dict[str, torch.nn.Module]) -> dict[str, Module]:
    """The denoiser of a family kohya names by the original model's modules (SD 3.x, FLUX.1): one entry per original
    module, fused q/k/v as one (formats/dit.py)."""
    out = {}
    for orig, parts in dit.original_modules(arch, _Plain(layers)).items():
        first = weight_shape(layers[parts[0][0]])
        rows = sum(b - a for _, a, b in parts)
        whole = len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == first[0]
        out[kohya.kohya_name(DENOISER, orig, arch)] = Module(
            DENOISER, orig, (rows, *first[1:]), len(first) == 4, parts[0][0] if whole else "",
            () if whole else tuple(parts))
    return out


def originals(base) -> dict[str, tuple[tuple[str, int, int], ...]] | None:
    """`dit.original_modules` of a loaded model's denoiser (PEFT's wrappers unwrapped); None for the families kohya
    names by diffusers or LDM paths."""
    if base.spec.denoiser_names != "original":
        return None
    return dit.original_modules(base.arch, _Plain(_layers(base.denoiser)))


def weight_of(model: torch.nn.Module, m: Module) -> torch.Tensor:
    """The weight of `m` in `model` (its component), as a file's module sees it: fused parts concatenated."""
    if not m.parts:
        return model.get_submodule(m.module_path).weight
    return torch.cat([model.get_submodule(p).weight[a:b] for p, a, b in m.parts])


def set_weight(model: torch.nn.Module, m: Module, w: torch.Tensor) -> None:
    """Write `w` (the shape `weight_of` gives) into `model`'s weights of `m`, in their dtype (under no_grad)."""
    if not m.parts:
        weight = model.get_submodule(m.module_path).weight
        weight.copy_(w.to(weight.dtype))
        return
    i = 0
    for p, a, b in m.parts:
        weight = model.get_submodule(p).weight
        weight[a:b].copy_(w[i:i + b - a].to(weight.dtype))
        i += b - a


@functools.lru_cache(maxsize=4)
def kohya_table(arch: str) -> dict[str, Module]:
    """Canonical kohya module names of the real `arch` ("sd1", "sd2", "sdxl", "sd3", "flux"), built on the meta
    device."""
    return table_of(archs.meta_components(arch), arch)


def model_table(components: dict[str, torch.nn.Module], arch: str) -> dict[str, Module]:
    """`table_of` plus the non-canonical names loaders also apply (`aliases`): what an adapter is matched against."""
    table = table_of(components, arch)
    return table | {alias: table[c] for alias, c in aliases(table, arch).items()}


def aliases(table: dict[str, Module], arch: str) -> dict[str, str]:
    """Non-canonical names that kohya also loads -> canonical name: UNet modules under diffusers-style names where
    kohya names them by LDM paths (SDXL; kohya converts them, docs/kohya-format.md §1); FLUX's T5 under OneTrainer's
    `lora_te2_` besides kohya's `lora_te3_` (ComfyUI maps both, docs/lycoris-and-dit.md §7.3)."""
    if archs.get(arch).denoiser_names == "original":
        t5_te2 = "te2" not in archs.get(arch).components
        return {"lora_te2_" + k.removeprefix("lora_te3_"): k for k, m in table.items()
                if m.component == "te3" and t5_te2}
    if archs.get(arch).denoiser_names != "ldm":
        return {}
    return {"lora_unet_" + m.path.replace(".", "_"): k for k, m in table.items() if m.component == "unet"}


def _te_layers(table: dict[str, Module], component: str) -> int:
    layers = {int(m.path.split(".")[2]) for m in table.values()
              if m.component == component and m.path.startswith("encoder.layers.")}
    return max(layers) + 1 if layers else 0


@functools.lru_cache(maxsize=4)
def a1111_layers(arch: str) -> frozenset[str]:
    """A1111's `network_layer_mapping` names of a checkpoint of `arch` (the modules with weights LoRA can patch);
    empty for the families A1111 does not run (SD 3.x and FLUX.1 LoRAs: ComfyUI, Forge)."""
    if not archs.get(arch).a1111:
        return frozenset()
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
    """kohya module names ComfyUI's `model_lora_keys_unet`/`model_lora_keys_clip` map for `arch`'s reference model."""
    return comfy_keys_of(kohya_table(arch), arch)


def comfy_keys_of(table: dict[str, Module], arch: str) -> frozenset[str]:
    """The same for the model whose kohya table is `table`: ComfyUI maps the modules the loaded checkpoint has, so
    SD 3.5 Large's 38 joint blocks answer, not the 24 of the reference model (SD 3.5 Medium)."""
    keys = set()
    if archs.get(arch).denoiser_names == "original":
        # every `diffusion_model.<original path>.weight` as `lora_unet_<path with _>`; CLIP as for SDXL; T5 as
        # `lora_te{n}_<HF T5 path>`, n = 1 + CLIP-G present + CLIP-L present (3), FLUX also `lora_te2_` (§7.3)
        for k, m in table.items():
            if m.component == DENOISER:
                keys.add("lora_unet_" + m.path.replace(".", "_"))
            elif m.component == "te3":
                keys.add(k)
                if "te2" not in archs.get(arch).components:
                    keys.add("lora_te2_" + k.removeprefix("lora_te3_"))
        for comp in ("te1", "te2"):
            if comp in archs.get(arch).components:
                for b in range(_te_layers(table, comp)):
                    keys |= {f"lora_{comp}_text_model_encoder_layers_{b}_{c}" for c in _COMFY_TE}
        return frozenset(keys)
    for m in table.values():
        if m.component == "unet":
            keys.add("lora_unet_" + kohya.unet_to_ldm(m.path, arch).replace(".", "_"))
            keys.add("lora_unet_" + m.path.replace(".", "_"))
    for comp in archs.get(arch).te_components:
        for b in range(_te_layers(table, comp)):
            for p in _COMFY_TE_PREFIXES[comp]:
                keys |= {f"{p}_text_model_encoder_layers_{b}_{c}" for c in _COMFY_TE}
    return frozenset(keys)

