"""Module names of the original DiT trees (SAI's MMDiT for SD3/SD3.5, BFL's FLUX.1) <-> diffusers' transformers.

kohya's `lora_sd3.py` / `lora_flux.py` (and ComfyUI, which reads them) name LoRA modules by the ORIGINAL trees
(`joint_blocks.{i}.x_block.attn.qkv`, `double_blocks.{i}.img_attn.qkv`, `single_blocks.{i}.linear1`, ...), where
q/k/v (and, in FLUX single blocks, q/k/v + MLP-in) are one fused Linear. sdlora trains on diffusers'
`SD3Transformer2DModel` / `FluxTransformer2DModel`, which keep them separate. These tables relate the two.

The mapping is the one of diffusers' own single-file converters
(`convert_sd3_transformer_checkpoint_to_diffusers`, `convert_flux_transformer_checkpoint_to_diffusers`);
tests/test_dit_names.py checks it against them on random models, weights and biases exactly.

Row ranges: the original weight of a fused module is its parts' rows concatenated in the order listed. Three
adaLN projections are stored (shift, scale) in the original trees and (scale, shift) in diffusers (diffusers'
`swap_scale_shift`): FLUX `final_layer.adaLN_modulation.1` <-> `norm_out.linear`, SD3 `final_layer.adaLN_modulation.1`
<-> `norm_out.linear`, and the `adaLN_modulation.1` of SD3's last (pre-only) `context_block` <->
`transformer_blocks.{last}.norm1_context.linear` -- the last one IS inside a block, so kohya trains it by default.
"""

from __future__ import annotations

import re

ARCHS = ("sd3", "flux")
# the block roots of each original tree: a kohya name `lora_unet_<root>...` says the family by itself
BLOCK_ROOTS = {"sd3": ("joint_blocks_",), "flux": ("double_blocks_", "single_blocks_")}

# (diffusers path regex, original path template, slot in the fused original, swapped halves)
# Templates use \1 for the block index. Slots order the parts of a fused original module.
_FLUX_RULES = [
    (r"x_embedder", "img_in", 0),
    (r"context_embedder", "txt_in", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", 0),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", 0),
    # double-stream blocks
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin", 0),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_q", r"double_blocks.\1.img_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", r"double_blocks.\1.img_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", r"double_blocks.\1.img_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", 0),
    # single-stream blocks: linear1 = [q; k; v; mlp_in]
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", r"single_blocks.\1.linear1", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", r"single_blocks.\1.linear1", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", r"single_blocks.\1.linear1", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1", 3),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2", 0),
    # final layer
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "swap"),
    (r"proj_out", "final_layer.linear", 0),
]

_SD3_RULES = [
    (r"pos_embed\.proj", "x_embedder.proj", 0),  # the Conv2d patch embed
    (r"context_embedder", "context_embedder", 0),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", 0),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", 0),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", 0),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", 0),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1", 0),
    # swapped only in the pre-only last block (decided in _sd3_swap)
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1",
     "sd3_context_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.to_q", r"joint_blocks.\1.x_block.attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", r"joint_blocks.\1.x_block.attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", r"joint_blocks.\1.x_block.attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", r"joint_blocks.\1.context_block.attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", r"joint_blocks.\1.context_block.attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", r"joint_blocks.\1.context_block.attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj", 0),
    # SD3.5-medium dual attention (x stream only)
    (r"transformer_blocks\.(\d+)\.attn2\.to_q", r"joint_blocks.\1.x_block.attn2.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_k", r"joint_blocks.\1.x_block.attn2.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_v", r"joint_blocks.\1.x_block.attn2.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1", 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1", 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2", 0),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "swap"),
    (r"proj_out", "final_layer.linear", 0),
]

_RULES = {"flux": [(re.compile(p + r"\Z"), t, s) for p, t, s in _FLUX_RULES],
          "sd3": [(re.compile(p + r"\Z"), t, s) for p, t, s in _SD3_RULES]}


def _weighted_modules(model) -> dict[str, int]:
    """Diffusers path -> out rows, for every Linear and Conv2d of `model`.

    A PEFT-wrapped model (being trained) is read through its `base_layer`s; its own lora_A/lora_B layers are skipped.
    """
    import torch

    from sdlora.quant import weight_shape  # nf4 packs a Linear's weight: its shape is not [out, in]

    out = {}
    for name, m in model.named_modules():
        if ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B")):
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name.replace(".base_layer", "")] = int(weight_shape(m)[0])
    return out


def _sd3_pre_only(mods: dict[str, int], block: str) -> bool:
    """SD3's last joint block has a pre-only context stream: no context out-projection and no context MLP."""
    return (f"transformer_blocks.{block}.attn.to_add_out" not in mods
            and f"transformer_blocks.{block}.ff_context.net.0.proj" not in mods)


def original_modules(arch: str, model) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Original (SAI / BFL) module path -> its parts in the diffusers `model`, in the original weight's row order:
    ((diffusers module path, row start, row stop), ...), row ranges in the DIFFUSERS module.

    Covers every nn.Linear of `model` (blocks, embedders, final layer) and SD3's Conv2d patch embed
    (`x_embedder.proj` <-> `pos_embed.proj`). A 1:1 module has one part covering all its rows; a fused one
    (`qkv`: q, k, v; FLUX `linear1`: q, k, v, mlp-in) has several; a module whose shift/scale halves diffusers
    swaps lists the same diffusers module twice, second half first.
    Raises ValueError for an unknown arch or a Linear/Conv2d this table does not know (a new model variant)."""
    if arch not in _RULES:
        raise ValueError(f"no original DiT module names for arch {arch!r} (known: {', '.join(ARCHS)})")
    mods = _weighted_modules(model)
    groups: dict[str, list[tuple[int, tuple[tuple[str, int, int], ...]]]] = {}
    unknown = []
    for path, rows in mods.items():
        for rx, template, slot in _RULES[arch]:
            match = rx.match(path)
            if match:
                break
        else:
            unknown.append(path)
            continue
        original = match.expand(template)
        if slot == "sd3_context_norm":
            slot = "swap" if _sd3_pre_only(mods, match.group(1)) else 0
        if slot == "swap":
            if rows % 2:
                raise ValueError(f"{path}: {rows} rows cannot be split into shift and scale halves")
            half = rows // 2
            groups.setdefault(original, []).append((0, ((path, half, rows), (path, 0, half))))
        else:
            groups.setdefault(original, []).append((slot, ((path, 0, rows),)))
    if unknown:
        raise ValueError(f"{arch}: no original name for diffusers module(s) {', '.join(sorted(unknown))}")
    out = {}
    for original, parts in groups.items():
        slots = [s for s, _ in parts]
        if sorted(slots) != list(range(len(slots))):
            raise ValueError(f"{original}: incomplete fused module, parts {sorted(p[0][0] for _, p in parts)}")
        out[original] = tuple(part for _, ps in sorted(parts) for part in ps)
    return out



# The original trees' tensors that are not Linear/Conv2d weights or biases (qk-norm scales, SD3's positional
# table): diffusers name -> original name, as diffusers' single-file converters rename them.
_FLUX_OTHER = [
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]
_SD3_OTHER = [
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
]
_OTHER = {"flux": [(re.compile(p + r"\Z"), t) for p, t in _FLUX_OTHER],
          "sd3": [(re.compile(p + r"\Z"), t) for p, t in _SD3_OTHER]}

Piece = tuple[str, int | None, int | None]  # (original tensor name, row start, row stop); None, None: all of it


def tensor_sources(arch: str, model) -> dict[str, tuple[Piece, ...]]:
    """Where each tensor of the diffusers `model` (meta-device is enough) comes from in an original (BFL / SAI)
    file: diffusers parameter name -> the original tensors' row ranges, concatenated in this order.

    Derived from `original_modules` (a fused original weight's rows are its parts' rows in order; a swapped
    module's diffusers rows [0, half) are the original's second half) plus the norm scales and positional table.
    Streaming loaders read each tensor of a 24 GB file alone with it (sdlora/stream.py); tests/test_big_files.py
    checks it against diffusers' converters run on the real-size key sets."""
    out: dict[str, list[tuple[int, Piece]]] = {}
    for original, parts in original_modules(arch, model).items():
        offset = 0
        for path, start, stop in parts:
            for attr in ("weight", "bias"):
                out.setdefault(f"{path}.{attr}", []).append((start, (f"{original}.{attr}", offset,
                                                                     offset + stop - start)))
            offset += stop - start
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    sources = {k: tuple(p for _, p in sorted(v)) for k, v in out.items() if k in names}
    for name in names:
        for rx, template in _OTHER[arch]:
            m = rx.match(name)
            if m:
                sources[name] = ((m.expand(template), None, None),)
    return sources
