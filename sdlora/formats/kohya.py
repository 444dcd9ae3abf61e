"""kohya LoRA key names and tensors (docs/kohya-format.md). Pure functions on names and dicts.

Only this module knows key names. A module `<path>` of component `c` becomes `<prefix>_<path with . -> _>`
with three tensors: `.lora_down.weight` [r, in(, 1, 1)], `.lora_up.weight` [out, r(, 1, 1)] and a 0-dim `.alpha`.

Per family (`arch`: an `sdlora.archs` id; its spec says which components exist and how the UNet is named):
- SD 1.x / 2.x: components "unet" (`lora_unet_` + diffusers path) and "te" (`lora_te_text_model_...`).
- SDXL: "unet" (`lora_unet_` + the SGM/LDM path: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`), "te1" (CLIP-L,
  `lora_te1_text_model_...`) and "te2" (bigG, `lora_te2_text_model_...`).
Writing the neutral `AdapterFile` as a kohya file (`to_tensors`, `save`) is here too.
The diffusers <-> LDM UNet name maps (`unet_to_ldm`, `unet_from_ldm`) and A1111's kohya -> compvis mapping
(`a1111_name`, docs/kohya-format.md §5) are here too.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from sdlora import archs
from sdlora.formats import file_io, meta
from sdlora.formats.adapter import AdapterFile, AdapterModule
from sdlora.lora import kinds

# component -> key prefix. SD 1.x/2.x have a single text encoder: `lora_te`, never `lora_te1` (kohya rejects it).
PREFIX = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2", "te3": "lora_te3"}
TE_COMPONENTS = ("te", "te1", "te2", "te3")
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
# key suffix of each role, per kind record (sdlora.lora.kinds; LyCORIS's names, docs/lycoris-and-dit.md §1-5;
# what A1111 and ComfyUI read). A new kind adds its line here.
_LORA = {"down": DOWN, "up": UP, "mid": "lora_mid.weight", "magnitude": "dora_scale"}
ROLE_SUFFIX: dict[kinds.KindSpec, dict[str, str]] = {
    kinds.LORA: _LORA, kinds.LOCON: _LORA, kinds.DORA: _LORA,
    kinds.LOHA: {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1",
             "t2": "hada_t2", "magnitude": "dora_scale"},
    kinds.LOKR: {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
             "w2b": "lokr_w2_b", "t2": "lokr_t2", "magnitude": "dora_scale"},
    kinds.FULL: {"diff": "diff", "diff_b": "diff_b"},
}
SUFFIXES = (ALPHA, *sorted({s for roles in ROLE_SUFFIX.values() for s in roles.values()}, key=len, reverse=True))


def kind_of(suffixes) -> str | None:
    """The kind a module's key suffixes make (as A1111 and ComfyUI detect it), None when they mix kinds or make no
    module: hada_* LoHa, lokr_* LoKr, diff full, lora_down/lora_up LoRA (locon for a conv with a kernel or a Tucker
    core: the caller decides from shapes; dora with a dora_scale)."""
    suffixes = set(suffixes) - {ALPHA, "dora_scale"}
    for spec, table in ROLE_SUFFIX.items():
        if not spec.pair and suffixes and suffixes <= set(table.values()):
            return spec.name
    if {DOWN, UP} <= suffixes and suffixes <= set(_LORA.values()):
        return kinds.LORA.name
    return None


def roles_of(kind: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one module -> {role: tensor}."""
    back = {v: k for k, v in ROLE_SUFFIX[kinds.get(kind)].items()}
    return {back[k]: v for k, v in parts.items() if k in back}
_LDM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def component_of(name: str) -> str | None:
    """The component a kohya key or module name belongs to ("unet", "te", "te1", "te2"), None when it is not one."""
    return next((c for c, p in sorted(PREFIX.items(), key=lambda x: -len(x[1])) if name.startswith(p + "_")), None)


def is_ldm_unet_name(name: str) -> bool:
    """Does a kohya name use the LDM/SGM UNet paths (as kohya names SDXL modules)?"""
    return name.startswith(_LDM_UNET)


def is_cross_attention_kv(name: str) -> bool:
    """Is this the cross-attention key or value projection (input width = the text width)?"""
    return name.endswith(("attn2_to_k", "attn2_to_v"))


def te_layer(name: str) -> int | None:
    """Text-encoder layer index of a kohya text-encoder module name."""
    m = re.match(r"lora_te\d?_text_model_encoder_layers_(\d+)_", name)
    return int(m[1]) if m else None


def te_path(module_name: str) -> str:
    """A text-encoder module path without `text_model.` (transformers 5 has none; 4 has it)."""
    return module_name.removeprefix("text_model.")


def kohya_name(component: str, module_name: str, arch: str = "sd1") -> str:
    """kohya module name of `module_name` (a diffusers/transformers module path) in `component`.

    transformers 5.x's CLIPTextModel has no `text_model` submodule; the canonical names every loader matches
    keep it (`lora_te_text_model_encoder_layers_0_...`), so it is added here when missing. SDXL UNet names are
    the SGM/LDM ones kohya trains on (`unet_to_ldm`). T5-XXL (`te3`) keeps its HF path
    (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`). SD 3.x / FLUX.1 denoiser modules are passed by their
    original paths already (formats/dit.py, `layouts.table_of`).
    """
    if component == "te3":
        pass
    elif component in TE_COMPONENTS and module_name != "text_projection":
        module_name = "text_model." + te_path(module_name)
    elif component == "unet" and archs.get(arch).denoiser_names == "ldm":
        module_name = unet_to_ldm(module_name, arch)
    return PREFIX[component] + "_" + module_name.replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# diffusers <-> LDM (compvis / SGM) UNet module paths

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_config(arch_or_config) -> dict:
    if not isinstance(arch_or_config, str):
        return dict(arch_or_config)
    return archs.load_config(arch_or_config, "unet")


def _block_pairs(cfg: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of a UNet2DConditionModel config."""
    n_per = cfg["layers_per_block"]
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    pairs = [("time_embedding.linear_1", "time_embed.0", False), ("time_embedding.linear_2", "time_embed.2", False),
             ("add_embedding.linear_1", "label_emb.0.0", False), ("add_embedding.linear_2", "label_emb.0.2", False),
             ("conv_in", "input_blocks.0.0", False), ("conv_norm_out", "out.0", False), ("conv_out", "out.2", False),
             ("mid_block.attentions.0", "middle_block.1", False), ("mid_block.resnets.0", "middle_block.0", True),
             ("mid_block.resnets.1", "middle_block.2", True)]
    for i, kind in enumerate(down):
        for j in range(n_per):
            n = 1 + (n_per + 1) * i + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", True))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", False))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(n_per + 1) * (i + 1)}.0.op", False))
    for i, kind in enumerate(up):
        for j in range(n_per + 1):
            n = (n_per + 1) * i + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True))
            if "CrossAttn" in kind:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", False))
        if i < len(up) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{(n_per + 1) * i + n_per}.{slot}.conv",
                          False))
    return pairs


@functools.lru_cache(maxsize=16)
def _pairs(key: str) -> tuple[tuple[str, str, bool], ...]:
    import json

    return tuple(_block_pairs(json.loads(key)))


def _rename(path: str, cfg: dict, to_ldm: bool) -> str | None:
    import json

    keep = ("layers_per_block", "down_block_types", "up_block_types")
    for d, l, resnet in _pairs(json.dumps({k: list(cfg[k]) if k != "layers_per_block" else cfg[k] for k in keep})):
        src, dst = (d, l) if to_ldm else (l, d)
        if path == src or path.startswith(src + "."):
            rest = path[len(src) + 1:]
            if resnet and rest:
                table = _RESNET_LDM if to_ldm else {v: k for k, v in _RESNET_LDM.items()}
                for a, b in table.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return dst + ("." + rest if rest else "")
    return None


def unet_to_ldm(path: str, arch="sd1") -> str:
    """LDM/SGM path (`input_blocks.1.1.transformer_blocks.0.attn2.to_q`) of a diffusers UNet path or parameter
    name; `arch` is "sd1"/"sd2"/"sdxl" or a UNet config dict. Unknown paths are returned unchanged."""
    out = _rename(path, _unet_config(arch), to_ldm=True)
    return path if out is None else out


def unet_from_ldm(path: str, arch="sd1") -> str | None:
    """diffusers path of an LDM/SGM UNet path or parameter name; None when it names no block of the UNet."""
    return _rename(path, _unet_config(arch), to_ldm=False)


# ----------------------------------------------------------------------------------------------------------
# AUTOMATIC1111's mapping (extensions-builtin/Lora/networks.py, docs/kohya-format.md §5)

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _a1111_openclip(prefix: str, layer: str, rest: str) -> str:
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"{prefix}model_transformer_resblocks_{layer}_{rest}"


def a1111_convert(name: str, arch: str) -> str:
    """A1111's `convert_diffusers_name_to_compvis` of a kohya module name (SD 1.x block arithmetic)."""
    def res(kind, suffix):
        return _A1111_RESNET.get(suffix, suffix) if kind == "resnets" else suffix

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
            f"{1 if m[2] == 'attentions' else 0}_{res(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{res(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
            f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
            f"{1 if m[2] == 'attentions' else 0}_{res(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
            f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: _a1111_openclip("", m[1], m[2])
            if archs.get(arch).text_encoders[0].ldm_layout == "openclip"
            else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: _a1111_openclip("1_", m[1], m[2])),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return fn(m)
    return name


_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_name(name: str, arch: str, layers) -> str | None:
    """The A1111 network-layer name (`network_layer_mapping` key) a kohya module `name` is applied to, or None
    when A1111 matches nothing. `layers` is the set of A1111 layer names of the checkpoint (`a1111_layers`)."""
    key = a1111_convert(name, arch)
    if key in layers:
        return key
    m = _X_PROJ.match(key)
    if m and m[1] in layers:
        return m[1]
    if "lora_unet" in name:
        key = name.replace("lora_unet", "diffusion_model")
        return key if key in layers else None
    if "lora_te1_text_model" in name:
        for repl in ("0_transformer_text_model", "transformer_text_model"):
            key = name.replace("lora_te1_text_model", repl)
            if key in layers:
                return key
    return None


def openclip_layer_names(n_layers: int, prefix: str = "") -> set[str]:
    """A1111 layer names of an OpenCLIP text transformer (SD 2.x `cond_stage_model.wrapped`, SDXL embedder 1)."""
    out = set()
    for i in range(n_layers):
        b = f"{prefix}model_transformer_resblocks_{i}"
        out |= {b, f"{b}_attn", f"{b}_attn_out_proj", f"{b}_ln_1", f"{b}_ln_2", f"{b}_mlp", f"{b}_mlp_c_fc",
                f"{b}_mlp_c_proj"}
    return out


# ----------------------------------------------------------------------------------------------------------
# Tensors


def module_of_key(key: str) -> tuple[str, str] | None:
    """Split a kohya tensor key into (kohya module name, suffix); None when it is not a kohya LoRA key."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def to_tensors(adapter: AdapterFile, dtype: torch.dtype | None = None,
               alpha_if_missing: float | None = None) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS state dict of an AdapterFile: each role under its key (`ROLE_SUFFIX`), plus alpha (omitted
    where the module has none, unless `alpha_if_missing`; never for a full diff, which has none), cast to `dtype`
    when given (alpha too, as kohya does)."""
    out = {}
    for name, m in adapter.modules.items():
        dt = dtype or next(iter(m.tensors.values())).dtype
        for role, t in m.tensors.items():
            out[f"{name}.{ROLE_SUFFIX[m.kind_spec][role]}"] = t.detach().to(dt).contiguous()
        alpha = m.alpha if m.alpha is not None else alpha_if_missing
        if alpha is not None and m.kind_spec.has_alpha:
            out[f"{name}.{ALPHA}"] = torch.tensor(float(alpha), dtype=dt)
    return out


def fuse(mods: dict[str, tuple[str, dict[str, torch.Tensor], float]],
         originals: dict[str, tuple[tuple[str, int, int], ...]]
         ) -> dict[str, tuple[str, dict[str, torch.Tensor], float]]:
    """Trained LoRAs on diffusers module paths -> LoRAs on the original model's modules (kohya's SD 3.x / FLUX.1
    layout; `originals` is `dit.original_modules`: original path -> (diffusers path, row start, row stop) parts).

    The LoRAs of the k diffusers modules that make one original module (to_q, to_k, to_v -> qkv) become one: downs
    stacked [k·r, in], ups placed block-diagonally at their rows [out, k·r] (zero rows where a part is not
    trained), alpha·k, so that the alpha/rank every loader computes is the trained alpha/r: exactly the trained
    ΔW, and not kohya's `split_qkv` pitfall (§7.1: alpha kept, 3-4x too weak). A part listed at permuted rows
    (a swapped shift/scale) has its up rows permuted the same way. Parts of different ranks or alphas (another
    trainer's file) have their scale alpha/r folded into their ups, and the fused alpha is its rank (scale 1)."""
    owner = {}
    for orig, parts in originals.items():
        for p, _, _ in parts:
            owner.setdefault(p, orig)
    groups: dict[str, dict] = {}
    for path, v in mods.items():
        if path not in owner:
            raise ValueError(f"{path} is no part of an original module")
        groups.setdefault(owner[path], {})[path] = v
    out = {}
    for orig, trained in groups.items():
        if {k for k, _, _ in trained.values()} != {kinds.LORA.name}:
            raise ValueError(f"{orig}: only plain LoRAs fuse")
        parts = originals[orig]
        order = list(dict.fromkeys(p for p, _, _ in parts if p in trained))
        ranks = [trained[p][1]["down"].shape[0] for p in order]
        same = len(set(ranks)) == 1 and len({trained[p][2] for p in order}) == 1
        ups = {p: trained[p][1]["up"] * (1.0 if same else trained[p][2] / trained[p][1]["down"].shape[0])
               for p in order}
        cols = [sum(ranks[:j]) for j in range(len(order))]
        up = ups[order[0]].new_zeros(sum(b - a for _, a, b in parts), sum(ranks))
        i = 0
        for p, a, b in parts:
            if p in trained:
                j = order.index(p)
                up[i:i + b - a, cols[j]:cols[j] + ranks[j]] = ups[p][a:b]
            i += b - a
        alpha = trained[order[0]][2] * len(order) if same else float(sum(ranks))
        out[orig] = (kinds.LORA.name, {"down": torch.cat([trained[p][1]["down"] for p in order]), "up": up}, alpha)
    return out


def from_trained(layers: dict[str, dict[str, tuple[str, dict[str, torch.Tensor], float]]], arch: str,
                 originals: dict | None = None) -> AdapterFile:
    """An AdapterFile of trained adapters of any kind: {component: {module path: (kind, tensors by role, alpha)}}
    (what `sdlora.lora.inject.collect_modules` returns, already in the LyCORIS layout), named as kohya names them.
    `originals` (`dit.original_modules` of the denoiser) for the families kohya names by original modules: the
    denoiser's LoRAs are fused onto them (`fuse`)."""
    modules = {}
    if archs.get(arch).denoiser_names == "original" and "unet" in layers:
        layers = layers | {"unet": fuse(layers["unet"], originals)}
    for component, mods in layers.items():
        for path, (kind, tensors, alpha) in mods.items():
            name = kohya_name(component, path, arch)
            modules[name] = AdapterModule(name, kind, tensors, float(alpha))
    return AdapterFile(modules=modules, source="sdlora", arch=arch)


def save(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> Path:
    """Write kohya `tensors` atomically with `metadata` and kohya's `sshs_*` hashes (recomputed)."""
    metadata = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = meta.addnet_hashes(tensors, metadata)
    file_io.atomic_save(tensors, Path(path), metadata)
    return Path(path)
