"""Original-layout (LDM / SGM) single-file checkpoints, loaded with no network: the model configs are derived from
the file's own tensors, the weights converted with diffusers' public single-file helpers, the tokenizers built
from the BPE file sdlora ships.

Why not `from_single_file`: it fetches the diffusers configs (and tokenizer files) from the hub, which fails
offline ("Cannot find … cached snapshot"); `config=` a local diffusers folder works offline but needs that folder,
and `original_config=` an LDM yaml still fetches the tokenizers — and both describe the hub model, not a fine-tune
or a test-sized file. Deriving every width, depth and layer count from the tensors (as ComfyUI's model detection
does) loads whatever the file holds; what the weights cannot show (attention heads, group-norm groups, activation
functions) comes from the family's public config and rules (`sdlora.archs`), or from the `sdlora.config.*`
metadata sdlora writes into its own files (`ldm_metadata`), so that its test-sized models come back exactly.

Prediction type (ε or v) is not in the weights either; in order: the caller's choice (`--prediction-type`),
ComfyUI's `v_pred` marker tensor, the `modelspec.prediction_type` metadata, for families whose variants share a
layout (SD 2.x) ComfyUI's heuristic (the spread of one layer-norm bias: > 0.09 is v), else the family default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora import archs
from sdlora.archs import ArchSpec
from sdlora.errors import SdloraError, cause

UNET = "model.diffusion_model."
VAE = "first_stage_model."
V_PRED_MARKER = "v_pred"  # ComfyUI saves an empty tensor of this name in v-prediction checkpoints
# ComfyUI's SD 2.x v-prediction heuristic (comfy/supported_models.py SD20.model_type)
_V_HEURISTIC_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_HEURISTIC_STD = 0.09
MICRO_CONDITIONS = 6  # SDXL's original size, crop offset and target size, each embedded separately
META_PREFIX = "sdlora.config."  # + diffusers component: the config values the weights do not show (JSON)
# config keys the weights do not determine, written by `ldm_metadata` so sdlora's own files load exactly
UNDERIVED = {"unet": ("attention_head_dim", "norm_num_groups", "sample_size", "upcast_attention"),
             "vae": ("norm_num_groups", "sample_size", "scaling_factor"),
             "text_encoder": ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")}


def _levels(ids: list[int], is_down) -> list[list[int]]:
    out = [[]]
    for n in ids:
        if is_down(n):
            out.append([])
        else:
            out[-1].append(n)
    return out


def _ids(sd, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})


def _depth(sd, prefix: str) -> int:
    return len(_ids(sd, prefix + "transformer_blocks."))


def derive_unet_config(sd: dict, spec: ArchSpec, pooled_dim: int | None = None, known: dict | None = None) -> dict:
    """The UNet2DConditionModel config values the tensors of an LDM/SGM UNet determine (`sd`: name -> tensor or
    anything with `.shape`); attention heads by the family's rule unless `known` (the file's metadata) says."""
    p = UNET
    try:
        conv_in = sd[p + "input_blocks.0.0.weight"].shape
        ids = _ids(sd, p + "input_blocks.")[1:]
        levels = _levels(ids, lambda n: p + f"input_blocks.{n}.0.op.weight" in sd)
        per = {len(lv) for lv in levels}
        if len(per) != 1:
            raise SdloraError(f"the UNet's levels hold different numbers of blocks ({sorted(per)}); sdlora loads "
                              "Stable Diffusion UNets only")
        n_per = per.pop()
        widths = [sd[p + f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0] for lv in levels]
        attn = [any(k.startswith(p + f"input_blocks.{lv[0]}.1.") for k in sd) for lv in levels]
        depth = [_depth(sd, p + f"input_blocks.{lv[0]}.1.") if a else 1 for lv, a in zip(levels, attn)]
        up_depth = [_depth(sd, p + f"output_blocks.{(n_per + 1) * i}.1.") or 1 for i in range(len(levels))]
        first = next((lv[0] for lv, a in zip(levels, attn) if a), None)
        if first is None:
            raise SdloraError("the UNet has no attention blocks; sdlora loads Stable Diffusion UNets only")
        a = p + f"input_blocks.{first}.1."
        cfg = {
            "in_channels": conv_in[1], "out_channels": sd[p + "out.2.weight"].shape[0],
            "block_out_channels": widths, "layers_per_block": n_per,
            "down_block_types": ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(attn)],
            "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
            "cross_attention_dim": sd[a + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
            "use_linear_projection": len(sd[a + "proj_in.weight"].shape) == 2,
            "attention_head_dim": spec.unet_heads or [w // spec.unet_head_channels for w in widths],
        }
    except KeyError as e:
        raise SdloraError(f"the checkpoint's UNet lacks {e.args[0]}; the file is incomplete or not a Stable "
                          "Diffusion checkpoint") from None
    if known and "attention_head_dim" in known:
        cfg["attention_head_dim"] = known["attention_head_dim"]
    elif not spec.unet_heads and min(widths) < spec.unet_head_channels:
        raise SdloraError(f"the UNet is {min(widths)} channels wide, narrower than one "
                          f"{spec.unet_head_channels}-channel attention head, and the file does not say its heads; "
                          "it was not written by a known trainer")
    if up_depth != list(reversed(depth)):
        cfg["reverse_transformer_layers_per_block"] = up_depth
    if spec.micro_conditioning and p + "label_emb.0.0.weight" in sd:
        adm = sd[p + "label_emb.0.0.weight"].shape[1]
        cfg["projection_class_embeddings_input_dim"] = adm
        if pooled_dim:
            cfg["addition_time_embed_dim"] = (adm - pooled_dim) // MICRO_CONDITIONS
    return cfg


def derive_vae_config(sd: dict) -> dict:
    """The AutoencoderKL config values the tensors of an LDM VAE (`first_stage_model.`) determine."""
    p = VAE + "encoder."
    try:
        levels = _ids(sd, p + "down.")
        widths = [sd[p + f"down.{i}.block.{len(_ids(sd, p + f'down.{i}.block.')) - 1}.conv2.weight"].shape[0]
                  for i in levels]
        return {"in_channels": sd[p + "conv_in.weight"].shape[1],
                "out_channels": sd[VAE + "decoder.conv_out.weight"].shape[0],
                "latent_channels": sd[VAE + "decoder.conv_in.weight"].shape[1], "block_out_channels": widths,
                "layers_per_block": len(_ids(sd, p + "down.0.block.")),
                "down_block_types": ["DownEncoderBlock2D"] * len(widths),
                "up_block_types": ["UpDecoderBlock2D"] * len(widths)}
    except KeyError as e:
        raise SdloraError(f"the checkpoint's VAE lacks {e.args[0]}; the file is incomplete (a checkpoint saved "
                          "without its VAE cannot be loaded)") from None


def derive_text_encoder_config(sd: dict, te, known: dict | None = None) -> dict:
    """The CLIP text-model config values the tensors of one encoder (`te`: a TextEncoderSpec) determine."""
    p = te.ldm_prefix
    try:
        if te.ldm_layout == "openclip":
            tok, pos = sd[p + "token_embedding.weight"].shape, sd[p + "positional_embedding"].shape
            layers = len(_ids(sd, p + "transformer.resblocks."))
            inter = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            proj = sd[p + "text_projection"].shape[1] if p + "text_projection" in sd else None
        else:
            q = p + "text_model." if any(k.startswith(p + "text_model.") for k in sd) else p  # older files lack it
            tok, pos = (sd[q + "embeddings.token_embedding.weight"].shape,
                        sd[q + "embeddings.position_embedding.weight"].shape)
            layers = len(_ids(sd, q + "encoder.layers."))
            inter = sd[q + "encoder.layers.0.mlp.fc1.weight"].shape[0]
            proj = sd[p + "text_projection.weight"].shape[0] if p + "text_projection.weight" in sd else None
    except KeyError as e:
        raise SdloraError(f"the checkpoint's text encoder lacks {e.args[0]}; the file is incomplete") from None
    if not (known and "num_attention_heads" in known) and tok[1] < te.head_channels:
        raise SdloraError(f"the text encoder is {tok[1]} wide, narrower than one {te.head_channels}-channel attention "
                          "head, and the file does not say its heads; it was not written by a known trainer")
    cfg = {"vocab_size": tok[0], "hidden_size": tok[1], "max_position_embeddings": pos[0], "num_hidden_layers": layers,
           "intermediate_size": inter, "num_attention_heads": tok[1] // te.head_channels}
    if proj is not None:
        cfg["projection_dim"] = proj
    return cfg


def derive_configs(sd: dict, spec: ArchSpec, metadata: dict | None = None) -> dict[str, dict]:
    """Full diffusers/transformers configs {"unet": .., "vae": .., "text_encoder": .., ...} of a checkpoint: the
    family's public config, overridden by what the tensors show, then by sdlora's own `sdlora.config.*` metadata."""
    metadata = metadata or {}

    def own(component: str) -> dict:
        try:
            return json.loads(metadata.get(META_PREFIX + component, "{}"))
        except json.JSONDecodeError:
            return {}

    out = {}
    pooled = None
    for t in spec.text_encoders:
        public = archs.load_config(spec.id, t.attr)
        cfg = public | derive_text_encoder_config(sd, t, own(t.attr))
        if t.ldm_extra_layer and cfg["num_hidden_layers"] == public["num_hidden_layers"] + 1:
            cfg["num_hidden_layers"] -= 1  # the layer the conditioning never runs (diffusers drops it too)
        out[t.attr] = cfg | own(t.attr)
        if t.pooled:
            pooled = out[t.attr].get("projection_dim")
    out[spec.denoiser] = (archs.load_config(spec.id, spec.denoiser)
                          | derive_unet_config(sd, spec, pooled, own(spec.denoiser)) | own(spec.denoiser))
    out["vae"] = archs.load_config(spec.id, "vae") | derive_vae_config(sd) | own("vae")
    return out


def ldm_metadata(base) -> dict[str, str]:
    """Metadata for an original-layout file of `base`: its prediction type (SAI model spec) and the config values
    its tensors do not show (`UNDERIVED`), so that `load_single_file` rebuilds exactly this model."""
    md = {"modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon"}
    for attr, module in base.modules.items():
        keys = UNDERIVED.get(attr) or UNDERIVED["text_encoder"]
        cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        md[META_PREFIX + attr] = json.dumps({k: cfg[k] for k in keys if k in cfg})
    return md


def prediction_type(sd: dict, metadata: dict, spec: ArchSpec, requested: str | None = None) -> str:
    """ε ("epsilon") or v ("v_prediction") for a checkpoint; see the module docstring for the order."""
    if requested:
        return requested
    if V_PRED_MARKER in sd:
        return "v_prediction"
    declared = (metadata or {}).get("modelspec.prediction_type", "").strip().lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if declared in ("epsilon", "eps"):
        return "epsilon"
    if spec.ambiguous_prediction and _V_HEURISTIC_KEY in sd:
        bias = sd[_V_HEURISTIC_KEY].float()
        return "v_prediction" if torch.std(bias, unbiased=False).item() > _V_HEURISTIC_STD else "epsilon"
    return archs.load_config(spec.id, "scheduler").get("prediction_type", "epsilon")


def _tokenizer(vocab_size: int, te):
    """The tokenizer of an encoder with `vocab_size` tokens: CLIP's BPE (shipped), or the built-in tiny models'."""
    from sdlora.archs.clip_tokenizer import VOCAB_SIZE, clip_tokenizer
    from sdlora.tiny import tiny_tokenizer

    if vocab_size == VOCAB_SIZE:
        return clip_tokenizer(te.pad_token)
    tiny = tiny_tokenizer()
    if vocab_size == len(tiny):
        return tiny
    from transformers import CLIPTokenizer

    from sdlora.toy import BASE_DIR  # the toy model's word-level tokenizer (a merged `toy` written as one file)

    toy = CLIPTokenizer.from_pretrained(BASE_DIR / "tokenizer")
    if vocab_size == len(toy):
        return toy
    raise SdloraError(f"the text encoder has {vocab_size} tokens, CLIP has {VOCAB_SIZE}; sdlora has no tokenizer "
                      "for it (pass a diffusers folder, which carries its own)")


def _load(cls_build, cfg: dict, state: dict, what: str, drop=(), dtype=None):
    """Build a model from `cfg` without initialising its weights, then load `state` strictly (floating-point
    tensors cast to `dtype`: an fp16 file loads as fp32 unless asked otherwise)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers (CLIP's position ids) real
        model = cls_build(cfg)
    own = set(model.state_dict())
    # transformers 5: CLIPTextModel has no `text_model` level, CLIPTextModelWithProjection has
    state = {k if k in own or "text_model." + k not in own else "text_model." + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or k not in drop}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        first = sorted(missing)[0] if missing else sorted(unexpected)[0]
        raise SdloraError(f"the checkpoint's {what} does not fit its derived config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected weights, e.g. {first}); the file may be damaged or of an "
                          "unsupported variant")
    # fresh, aligned memory: tensors read from the file are views at arbitrary offsets, on which CPU kernels may
    # take other (last-bit different) paths than on the model they were written from
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    aligned = {k: v if v.is_contiguous() and v.data_ptr() % 64 == 0 else v.contiguous().clone()
               for k, v in state.items()}
    model.load_state_dict(aligned, strict=True, assign=True)
    return model.eval()


def _te_state(sd: dict, te, model_cfg: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    part = {k: v for k, v in sd.items() if k.startswith(te.ldm_prefix)}
    if te.ldm_layout == "openclip":
        class _Cfg:  # convert_open_clip_checkpoint reads only `config.hidden_size` of the model
            config = type("C", (), {"hidden_size": model_cfg["hidden_size"]})

        state = convert_open_clip_checkpoint(_Cfg, part, prefix=te.ldm_prefix)
    else:
        state = convert_ldm_clip_checkpoint(part, remove_prefix=te.ldm_prefix)
    out = {}
    n = model_cfg["num_hidden_layers"]
    for k, v in state.items():
        k = k.removeprefix("text_model.")  # transformers 5's CLIPTextModel has no `text_model` level
        if k.endswith("position_ids") or (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= n):
            continue
        out[k] = v
    return out


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors checkpoint."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise SdloraError(f"{path}: not a readable .safetensors file ({cause(e)}); re-download "
                          "or re-export it") from e


def load_single_file(path: Path, spec: ArchSpec, dtype=None,
                     requested_prediction: str | None = None) -> tuple[dict, int | None]:
    """The diffusers components of an original-layout checkpoint of family `spec`, with no network access:
    (parts for `sdlora.models.from_components`, native resolution or None for the family's)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd, metadata = read(path)
    configs = derive_configs(sd, spec, metadata)
    parts: dict = {}
    for t in spec.text_encoders:
        cfg = configs[t.attr]
        tok = _tokenizer(cfg["vocab_size"], t)
        parts[t.tokenizer_attr] = tok
        cfg |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        parts[t.attr] = _load(archs.build, cfg, _te_state(sd, t, cfg), "text encoder",
                              drop=("text_projection.weight", "logit_scale"), dtype=dtype)
    unet_cfg = configs[spec.denoiser]
    parts[spec.denoiser] = _load(lambda c: diffusers.UNet2DConditionModel.from_config(c), unet_cfg,
                                 convert_ldm_unet_checkpoint(sd, unet_cfg), "UNet", dtype=dtype)
    vae_cfg = configs["vae"]
    parts["vae"] = _load(lambda c: diffusers.AutoencoderKL.from_config(c), vae_cfg,
                         convert_ldm_vae_checkpoint(sd, vae_cfg), "VAE", dtype=dtype)
    prediction = prediction_type(sd, metadata, spec, requested_prediction)
    parts["scheduler_config"] = archs.load_config(spec.id, "scheduler") | {"prediction_type": prediction}
    native = None
    if META_PREFIX + spec.denoiser in metadata:  # sdlora's own file: the size it was built for
        native = unet_cfg["sample_size"] * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return parts, native
