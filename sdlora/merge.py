"""`sdlora merge`: bake LoRA adapters into a base model, written as an original-layout (LDM) single file that
A1111 and ComfyUI load, or as a diffusers folder.

The fusion is sdlora.infer.blend's (W = W0 + Σ sᵢ·alphaᵢ/rᵢ·upᵢ·downᵢ, A1111's arithmetic). The LDM layout is the
reverse of diffusers' single-file conversion (loaders/single_file_utils.py): UNet `model.diffusion_model.*`
(sdlora.formats.kohya.unet_to_ldm), text encoders `cond_stage_model.transformer.text_model.*` (SD 1.x),
OpenCLIP `cond_stage_model.model.*` (SD 2.x) and `conditioner.embedders.{0,1}.*` (SDXL), VAE `first_stage_model.*`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdlora import guard
from sdlora.cli import add_part_args, load_model, part_values
from sdlora.errors import SdloraError
from sdlora.formats import checkpoint, embeddings, file_io, kohya
from sdlora.formats.meta import portable
from sdlora.formats.read import read_adapter
from sdlora.infer.blend import Blender
from sdlora.infer.cli import parse_lora_spec
from sdlora.models import checkpoint_keys, detect_checkpoint_arch, load_base, model_kinds_help
from sdlora.train import DTYPES

# ----------------------------------------------------------------------------------------------------------
# diffusers -> LDM state dicts


def unet_to_ldm_state(unet) -> dict[str, torch.Tensor]:
    cfg = dict(unet.config)
    return {"model.diffusion_model." + kohya.unet_to_ldm(k, cfg): v for k, v in unet.state_dict().items()}


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm_state(vae) -> dict[str, torch.Tensor]:
    """The reverse of diffusers' `convert_ldm_vae_checkpoint`, with the `first_stage_model.` prefix."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        key = k.replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            key = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.dim() == 2 and m[2] != "group_norm":
                v = v[:, :, None, None]
        key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", key)
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + key] = v
    return out


def clip_to_ldm_state(te, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model (SD 1.x, SDXL CLIP-L) under `prefix` (`cond_stage_model.transformer.`)."""
    return {prefix + "text_model." + kohya.te_path(k): v for k, v in te.state_dict().items()
            if not k.endswith("position_ids")}


_OPENCLIP = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]


def openclip_to_ldm_state(te, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP layout under `prefix` (`cond_stage_model.model.`): the reverse of diffusers'
    `convert_open_clip_checkpoint` (q/k/v stacked into `in_proj_*`, `text_projection` transposed)."""
    sd = {kohya.te_path(k): v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in _OPENCLIP:
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    if sd:
        raise SdloraError(f"text encoder has weights the OpenCLIP layout has no place for: {sorted(sd)[:3]}")
    return out


def ldm_state_dict(base) -> dict[str, torch.Tensor]:
    """The whole model (UNet, text encoder(s), VAE) in the original LDM/SGM single-file layout."""
    out = unet_to_ldm_state(base.denoiser) | vae_to_ldm_state(base.vae)
    for t in base.spec.text_encoders:
        layout = openclip_to_ldm_state if t.ldm_layout == "openclip" else clip_to_ldm_state
        out |= layout(base.modules[t.attr], t.ldm_prefix)
    if base.prediction_type == "v_prediction":  # ComfyUI's marker: the weights do not say ε or v
        out[checkpoint.V_PRED_MARKER] = torch.tensor([])
    return {k: v.detach().contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# merge


def check_out(model: str, loras: list[tuple[str, float, float]], out, overwrite: bool = False) -> Path:
    """The output checked before anything loads (sdlora.guard): a `.safetensors` file or a folder, neither the
    model nor an adapter, not replacing anything without --overwrite, writable."""
    out = Path(out)
    inputs = {"--model": model, "--lora": [p for p, _, _ in loras]}
    if out.suffix.lower() == ".safetensors":
        return guard.check_file(out, inputs=inputs, overwrite=overwrite)
    if out.suffix and not out.is_dir():
        raise SdloraError(f"--out {out}: write OUT.safetensors (a single file) or a folder (a diffusers model)")
    return guard.check_folder(out, inputs=inputs, overwrite=overwrite)


def merge(model: str, loras: list[tuple[str, float, float]], out, dtype: str = "fp16", base=None,
          overwrite: bool = False, parts: dict | None = None, say=print) -> Path:
    """Fuse `loras` [(file, text-encoder strength, unet strength)] into `model` and write `out`: a `.safetensors`
    single file (LDM layout) or a diffusers folder. `parts`: the part flags of a FLUX.1 / SD 3.5 single file
    (`sdlora.cli.part_values`)."""
    if not loras:
        raise SdloraError("merge needs at least one --lora FILE[:STRENGTH]")
    if dtype not in DTYPES:
        raise SdloraError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_out(model, loras, out, overwrite)
    files = [read_adapter(p) for p, _, _ in loras]
    with guard.OutputLock(out):
        path = _merge(model, loras, files, Path(out), dtype, base, overwrite, parts)
        keep_embeddings(files, path, say)
        return path


def keep_embeddings(files, out: Path, say) -> None:
    """A merged model holds the LoRA part only (a checkpoint has no place for new words: its vocabulary is fixed);
    the bundled embeddings of `files` (pivotal tuning) are written beside it as embedding files, said in one line."""
    for f in files:
        for name, vecs in f.embeddings.items():
            side = embeddings.save_file(vecs, embeddings.file_path(out, name), f.metadata)
            say(f"{f.path.name}: its embedding '{name}' is not merged (a checkpoint's vocabulary is fixed); written to "
                f"{side}: put it in the embeddings folder (A1111, ComfyUI) or load_textual_inversion it (diffusers)")


def _merge(model: str, loras, files, out: Path, dtype: str, base, overwrite: bool, parts: dict | None) -> Path:
    if base is None:
        base = load_model(model, parts) if parts else load_base(model)
    if Path(out).suffix.lower() == ".safetensors" and base.spec.denoiser_names == "original":
        raise SdloraError(f"--out {out}: a single-file checkpoint is written for SD 1.x/2.x/XL only; for "
                          f"{base.spec.label} pass a folder (--out FOLDER: "
                          "a diffusers model ComfyUI and diffusers load)")
    blender = Blender(base)
    strengths = {}
    for f, (_, te, unet) in zip(files, loras):
        r = blender.add(f)
        if r.unmatched:
            raise SdloraError(f"{f.path.name}: {len(r.unmatched)} modules or keys match nothing in '{base.name}' "
                              f"(first: {r.unmatched[0]}); run `sdlora verify {f.path}`")
        strengths[f.name] = (te, unet)
    blender.set_strengths(strengths)
    if out.suffix.lower() == ".safetensors":
        sd = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in ldm_state_dict(base).items()}
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise SdloraError(f"the merged weights hold NaN or Inf (first: {bad[0]}); nothing was written; check the "
                              "base model and the adapters (`sdlora verify FILE`)")
        merged = ", ".join(f"{portable(p)}:{te}:{u}" for p, te, u in loras)  # no local absolute paths
        file_io.atomic_save(sd, out, {"format": "pt", "sdlora.merged": merged}
                       | checkpoint.ldm_metadata(base))
        if detect_checkpoint_arch(checkpoint_keys(out)) is not base.spec:  # reads back as the same family
            raise SdloraError(f"{out} was written but does not read back as a {base.spec.label} checkpoint; this is a "
                              "bug in sdlora, please report it")
        return out
    pipe = base.pipeline()
    guard.write_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), overwrite)
    return out


def add_merge_args(p) -> None:
    p.add_argument("--model", required=True, help="required: the " + model_kinds_help(None))
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA to bake in, repeatable; FILE:S or FILE:TE:UNET as in `sdlora generate`")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="required: OUT.safetensors (single file, LDM layout for A1111/ComfyUI) or a "
                   "folder (diffusers)")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the single file (default: fp16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or what sdlora wrote in an existing --out folder")
    add_part_args(p)


def cmd_merge(args) -> int:
    loras = [parse_lora_spec(s) for s in args.lora]
    out = merge(args.model, loras, args.out, args.dtype, overwrite=args.overwrite, parts=part_values(args))
    print(out)
    return 0
