"""The built-in offline models `tiny` (SD 1.x), `tiny-sd2` (SD 2.x, v-prediction), `tiny-sdxl` (SDXL), `tiny-sd3`
(SD 3.5 Medium) and `tiny-flux` (FLUX.1-dev): the real module trees at toy widths, built from code, deterministically.

They exist for smoke runs and tests on machines that cannot download real weights. Every module name of their
UNets and text encoders is the same as SD 1.5's / SD 2.1's / SDXL's (same block types, layers per block,
transformer depths and text-encoder layer counts), so a LoRA file trained on one has exactly the keys a file for
the real architecture has; only widths are small. Their weights are random (seeded), so they draw noise.
"""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

from sdlora.archs import ArchSpec, build, get, load_config

TINY_RESOLUTION = 64
_SEED = 20240229


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer built offline (no merges): every byte, alone or word-final."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


TINY_MODELS = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}

# toy widths of each text-encoder kind; layer counts stay the real ones
_TINY_TE = {
    "clip": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32},
    # T5-XXL: the tokenizer is the tiny CLIP one (any tokenizer that gives ids below the vocabulary size works)
    "t5": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4},
}


def _te(arch: str, component: str, tokenizer, kind: str = "clip"):
    return build(load_config(arch, component) | _TINY_TE[kind] | {
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    })


def tiny_components(spec: ArchSpec | str = "sd1") -> dict:
    """UNet, text encoder(s), tokenizer(s), VAE and scheduler config of the tiny model of family `spec`, identical
    on every call. Block types, layer counts and text-encoder depths are the real ones (so module names are),
    widths are toy-sized (`spec.tiny_denoiser`); widths keep the real ratios between blocks (x, 2x, 4x, 4x), so the
    same resnets get a conv_shortcut."""
    spec = get(spec)
    arch = spec.id
    vae_cfg = load_config(arch, "vae") | {
        "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8,
        "sample_size": TINY_RESOLUTION,
    }
    denoiser_cfg = load_config(arch, spec.denoiser)
    if "sample_size" in denoiser_cfg:  # UNets and SD3's transformer: the latent size
        denoiser_cfg["sample_size"] = TINY_RESOLUTION // 8
    denoiser_cfg |= spec.tiny_denoiser
    sched_cfg = load_config(arch, "scheduler")
    out = {"scheduler_config": sched_cfg}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        out[spec.denoiser] = build(denoiser_cfg).eval()
        for t in spec.text_encoders:  # the same order as before the registry: weights are seeded in sequence
            tokenizer = tiny_tokenizer()
            out[t.tokenizer_attr] = tokenizer
            out[t.attr] = _te(arch, t.attr, tokenizer, t.kind).eval()
        out["vae"] = build(vae_cfg).eval()
    return out
