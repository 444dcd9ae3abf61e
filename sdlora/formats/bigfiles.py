"""FLUX.1 and SD 3.5 as people keep them: single files in BFL's / SAI's layout (`flux1-dev.safetensors`,
`sd3.5_large.safetensors`, with or without embedded text encoders and VAE) and the separate parts ComfyUI users
keep beside them (`clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn`,
`ae.safetensors`). Key names and config derivation only, from the tensors' names and shapes (a safetensors header
is enough: nothing here reads a weight); sdlora/bigload.py loads them piece by piece.

What is where, in a file (`parts`): the denoiser under `model.diffusion_model.` or at the top level (BFL's own
files), each embedded text encoder under its `text_encoders.<role>.transformer.` prefix in transformers' own
layout, the VAE under `first_stage_model.` in the LDM layout. A separate part file holds one of them, with or
without that prefix. Which variant it is comes from the tensors: FLUX.1-dev has `guidance_in`, schnell does not;
SD 3.5 Medium has dual attention (`attn2`) blocks, Large does not; every width and depth is read from a shape,
as ComfyUI's model detection does. What no tensor shows (FLUX's rotary axes, SD3's sample size) comes from the
public config, or from the `sdlora.config.*` metadata sdlora's own test-sized files carry.
"""

from __future__ import annotations

import json
import math
import re

from sdlora import archs
from sdlora.archs import ArchSpec
from sdlora.errors import SdloraError
from sdlora.formats.checkpoint import META_PREFIX, VAE, derive_text_encoder_config, derive_vae_config

DENOISER_PREFIXES = ("model.diffusion_model.", "")
# a part's role -> (the kohya/ComfyUI flag that gives it, a tensor name only that part has, in its own layout)
ROLES = {
    "clip_l": ("--clip-l", "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "clip_g": ("--clip-g", "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "t5xxl": ("--t5xxl", "encoder.block.0.layer.0.SelfAttention.q.weight"),
    "ae": ("--ae", "decoder.conv_in.weight"),
}
USUAL_FILE = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors",
              "ae": "ae.safetensors"}
_MARKERS = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight"}


def role_of(spec: ArchSpec, attr: str) -> str:
    """The part role ("clip_l", "clip_g", "t5xxl", "ae") of diffusers component `attr` of `spec`."""
    if attr == "vae":
        return "ae"
    t = next(t for t in spec.text_encoders if t.attr == attr)
    return t.ldm_prefix.split(".")[1]  # text_encoders.<role>.transformer.


def embedded_prefix(spec: ArchSpec, role: str) -> str:
    if role == "ae":
        return VAE
    return next(t.ldm_prefix for t in spec.text_encoders if t.ldm_prefix.split(".")[1] == role)


def denoiser_family(keys) -> tuple[str, str] | None:
    """("flux" or "sd3", the prefix of the denoiser's tensors) of a BFL/SAI-layout file, None if it has no DiT."""
    keys = set(keys)
    for arch, marker in _MARKERS.items():
        for prefix in DENOISER_PREFIXES:
            if prefix + marker in keys:
                return arch, prefix
    return None


def part_prefix(keys, spec: ArchSpec, role: str, alone: bool) -> str | None:
    """Where part `role` lies in a file with tensor names `keys`: its embedded prefix, or (`alone`: a file given
    for that part) no prefix; None if the file does not hold it."""
    marker = ROLES[role][1]
    prefixes = [embedded_prefix(spec, role)] + (["", "text_encoders." + role + ".transformer."] if alone else [])
    for p in prefixes:
        if p + marker in keys or (role.startswith("clip") and p + marker.removeprefix("text_model.") in keys):
            return p
    return None


def _count(keys, prefix: str) -> int:
    return len({int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)})


def _own(metadata: dict | None, attr: str) -> dict:
    try:
        return json.loads((metadata or {}).get(META_PREFIX + attr, "{}"))
    except json.JSONDecodeError:
        return {}


def flux_config(shapes: dict, p: str, metadata: dict | None = None) -> dict:
    """FluxTransformer2DModel config of the BFL-layout tensors under prefix `p` (`shapes`: name -> shape)."""
    head = shapes[p + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    inner, in_channels = shapes[p + "img_in.weight"]
    dev = p + "guidance_in.in_layer.weight" in shapes
    cfg = archs.load_config("flux", "transformer" if dev else "transformer_schnell") | {
        "in_channels": in_channels, "attention_head_dim": head, "num_attention_heads": inner // head,
        "num_layers": _count(shapes, p + "double_blocks."), "num_single_layers": _count(shapes, p + "single_blocks."),
        "joint_attention_dim": shapes[p + "txt_in.weight"][1],
        "pooled_projection_dim": shapes[p + "vector_in.in_layer.weight"][1], "guidance_embeds": dev}
    out = shapes[p + "final_layer.linear.weight"][0]
    if out != in_channels:
        cfg["out_channels"] = out
    return cfg | _own(metadata, "transformer")


def sd3_config(shapes: dict, p: str, metadata: dict | None = None) -> dict:
    """SD3Transformer2DModel config of the SAI-layout tensors under prefix `p`: 3.5 Large (no dual attention) or
    Medium (dual attention in the first blocks), every width and depth from the shapes."""
    depth = _count(shapes, p + "joint_blocks.")
    dual = sorted({int(k[len(p):].split(".")[1]) for k in shapes
                   if k.startswith(p + "joint_blocks.") and ".attn2." in k})
    inner, in_channels, patch, _ = shapes[p + "x_embedder.proj.weight"]
    head = archs.load_config("sd3", "transformer")["attention_head_dim"]  # 64 in every SD3 (not in the weights)
    cfg = archs.load_config("sd3", "transformer" if dual else "transformer_large") | {
        "num_layers": depth, "in_channels": in_channels, "patch_size": patch, "attention_head_dim": head,
        "num_attention_heads": inner // head, "caption_projection_dim": shapes[p + "context_embedder.weight"][0],
        "joint_attention_dim": shapes[p + "context_embedder.weight"][1],
        "pooled_projection_dim": shapes[p + "y_embedder.mlp.0.weight"][1],
        "out_channels": shapes[p + "final_layer.linear.weight"][0] // (patch * patch),
        "pos_embed_max_size": math.isqrt(shapes[p + "pos_embed"][1]),
        "qk_norm": "rms_norm" if p + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None}
    cfg["dual_attention_layers"] = dual
    own = _own(metadata, "transformer")
    if "attention_head_dim" in own:  # a test-sized file with other heads
        cfg["num_attention_heads"] = inner // own["attention_head_dim"]
    return cfg | own


def denoiser_config(arch: str, shapes: dict, prefix: str, metadata: dict | None = None) -> dict:
    try:
        return (flux_config if arch == "flux" else sd3_config)(shapes, prefix, metadata)
    except KeyError as e:
        raise SdloraError(f"the {archs.label(arch)} transformer lacks {e.args[0]}; the file is incomplete or of an "
                          "unsupported variant") from None


def clip_config(shapes: dict, spec: ArchSpec, attr: str, prefix: str, metadata: dict | None = None) -> dict:
    import dataclasses

    t = dataclasses.replace(next(t for t in spec.text_encoders if t.attr == attr), ldm_prefix=prefix,
                            ldm_layout="clip")
    own = _own(metadata, attr)
    cfg = archs.load_config(spec.id, attr) | derive_text_encoder_config(shapes, t, own) | own
    return cfg


def t5_config(shapes: dict, spec: ArchSpec, attr: str, p: str, metadata: dict | None = None) -> dict:
    """T5 encoder config of the tensors under `p` (transformers' T5EncoderModel names)."""
    try:
        vocab, d_model = shapes[p + "shared.weight"] if p + "shared.weight" in shapes else \
            shapes[p + "encoder.embed_tokens.weight"]
        heads = shapes[p + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
        inner = shapes[p + "encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        d_ff = shapes[p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except KeyError as e:
        raise SdloraError(f"the T5 encoder lacks {e.args[0]}; the file is incomplete or not T5-XXL") from None
    layers = _count(shapes, p + "encoder.block.")
    return archs.load_config(spec.id, attr) | {
        "vocab_size": vocab, "d_model": d_model, "num_heads": heads, "d_kv": inner // heads, "d_ff": d_ff,
        "num_layers": layers, "num_decoder_layers": layers} | _own(metadata, attr)


def vae_config(shapes: dict, spec: ArchSpec, prefix: str, metadata: dict | None = None) -> dict:
    ldm = {VAE + k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    return archs.load_config(spec.id, "vae") | derive_vae_config(ldm) | _own(metadata, "vae")


# one tensor saved under either name: T5's input embedding (transformers saves `shared.weight` alone, some
# single files `encoder.embed_tokens.weight` too or instead)
TIED = {"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"}


def identity_sources(model, prefix: str, keys) -> dict[str, tuple]:
    """Sources of a model stored in its library's own layout under `prefix` (a diffusers folder's components,
    CLIP and T5 files): every parameter (and persistent buffer the file has) by its own name, or with the
    `text_model.` level transformers 5's CLIPTextModel dropped, or under the other name of a tied tensor."""
    keys = set(keys)
    out = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        for cand in (name, "text_model." + name, TIED.get(name)):
            if cand and prefix + cand in keys:
                out[name] = ((prefix + cand, None, None),)
                break
    return out


def unused(keys, prefix: str, sources: dict) -> list[str]:
    """Tensors under `prefix` that no source reads (a T5 decoder, CLIP's position ids and logit scale are fine)."""
    used = {piece[0] for pieces in sources.values() for piece in pieces}
    skip = re.compile(r"(position_ids|logit_scale|text_projection\.weight|decoder\..*|lm_head\..*|"
                      r"encoder\.embed_tokens\.weight)\Z")
    return sorted(k for k in keys if k.startswith(prefix) and k not in used and not skip.search(k[len(prefix):]))
