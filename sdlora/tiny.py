"""The built-in offline model `tiny`: SD1.5's module tree at toy widths, built from code, deterministically.

It exists for smoke runs and tests on machines that cannot download real weights. Every module name of
its UNet and text encoder is the same as SD 1.5's (same block types, layers per block, 12 text-encoder
layers), so a LoRA file trained on it has exactly the keys an SD 1.5 file has; only widths are small.
Its weights are random (seeded), so it draws noise, not pictures.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def tiny_components() -> dict:
    """UNet, text encoder, tokenizer, VAE and noise scheduler of the `tiny` model, identical on every call."""
    tokenizer = tiny_tokenizer()
    unet_cfg = load_config("sd15", "unet") | {
        "block_out_channels": [32, 32, 64, 64],
        "norm_num_groups": 8,
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "sample_size": TINY_RESOLUTION // 8,
    }
    te_cfg = load_config("sd15", "text_encoder") | {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vae_cfg = load_config("sd15", "vae") | {
        "block_out_channels": [16, 16, 32, 32],
        "norm_num_groups": 8,
        "layers_per_block": 1,
        "sample_size": TINY_RESOLUTION,
    }
    sched_cfg = load_config("sd15", "scheduler")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        vae = AutoencoderKL.from_config(vae_cfg)
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    return {
        "unet": unet.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "vae": vae.eval(),
        "noise_scheduler": noise_scheduler,
        "scheduler_config": sched_cfg,
    }
