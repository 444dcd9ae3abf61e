"""The built-in offline models `tiny` (SD 1.x), `tiny-sd2` (SD 2.x, v-prediction) and `tiny-sdxl` (SDXL): the real
module trees at toy widths, built from code, deterministically.

They exist for smoke runs and tests on machines that cannot download real weights. Every module name of their
UNets and text encoders is the same as SD 1.5's / SD 2.1's / SDXL's (same block types, layers per block,
transformer depths and text-encoder layer counts), so a LoRA file trained on one has exactly the keys a file for
the real architecture has; only widths are small. Their weights are random (seeded), so they draw noise.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdlora.archs import load_config

TINY_RESOLUTION = 64
_SEED = 20240229


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable characters standing for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer built offline (no merges): every byte, alone or word-final."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


TINY_MODELS = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


def _te(arch: str, component: str, tokenizer, layers_kept: bool = True, **extra):
    cfg = load_config(arch, component) | {
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32,
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **extra,
    }
    cls = CLIPTextModelWithProjection if cfg.get("architectures") == ["CLIPTextModelWithProjection"] else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


def tiny_components(arch: str = "sd1") -> dict:
    """UNet, text encoder(s), tokenizer(s), VAE and noise scheduler of a tiny model of `arch` ("sd1", "sd2",
    "sdxl"), identical on every call. Block types, layer counts and text-encoder depths are the real ones (so
    module names are), widths are toy-sized."""
    tokenizer = tiny_tokenizer()
    vae_cfg = load_config(arch, "vae") | {
        "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION,
    }
    unet_cfg = load_config(arch, "unet") | {"norm_num_groups": 8, "sample_size": TINY_RESOLUTION // 8}
    # Widths keep the real ratios between blocks (x, 2x, 4x, 4x), so the same resnets get a conv_shortcut.
    if arch == "sd1":
        unet_cfg |= {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": 4, "cross_attention_dim": 32}
    elif arch == "sd2":
        unet_cfg |= {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4], "cross_attention_dim": 32}
    elif arch == "sdxl":
        # cross-attention sees both encoders' hidden states side by side (32 + 32); the added embedding is the
        # pooled bigG output (32) plus six size/crop numbers embedded at 8 each
        unet_cfg |= {"block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 4], "cross_attention_dim": 64,
                     "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32}
    else:
        raise ValueError(f"unknown arch {arch!r}")
    sched_cfg = load_config(arch, "scheduler")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        text_encoder = _te(arch, "text_encoder", tokenizer)
        text_encoder_2 = _te(arch, "text_encoder_2", tokenizer) if arch == "sdxl" else None
        vae = AutoencoderKL.from_config(vae_cfg)
    out = {
        "unet": unet.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "vae": vae.eval(),
        "noise_scheduler": DDPMScheduler.from_config(sched_cfg),
        "scheduler_config": sched_cfg,
    }
    if text_encoder_2 is not None:
        out |= {"text_encoder_2": text_encoder_2.eval(), "tokenizer_2": tiny_tokenizer()}
    return out
