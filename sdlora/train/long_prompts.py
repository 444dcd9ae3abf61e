"""CLIP conditioning beyond the family's defaults: --clip-skip (which layer) and --max-token-length (captions longer
than 75 tokens in chunks). `step.encode_text` calls `encode_clip` for each CLIP encoder; `apply` sets both on the
run's spec (`TextEncoderSpec.clip_skip`, `.chunks`), so every caller of `encode_text` (the text caches, the steps,
the fixed-noise loss) and the pipelines (`ArchSpec.pipeline_clip_skip`) condition alike.

Clip skip N, as A1111 (`CLIP_stop_at_last_layers`) and kohya (`get_hidden_states`) count it: the hidden states of the
N-th layer from the end, `hidden_states[-N]`; where the family reads the last layer (SD 1.x/2.x) the final layer norm
follows, as both apply it; where it reads the penultimate layer without the norm (SDXL, SD 3.x) N = 2 is its own
conditioning and N > 2 goes deeper, as diffusers' pipelines do with their `clip_skip` (N - 2 there). kohya's
sdxl_train only warns that clip skip does not work; sdlora applies the pipelines' meaning, so that training, sample
grids and `generate` agree.

Long captions, as A1111 encodes prompts (`sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase`): the caption's
tokens (no BOS/EOS) are cut into chunks of 75; each chunk becomes a 77-token sequence [BOS, its tokens, EOS,
padding], encoded alone, and the chunks' hidden states are concatenated along the sequence (77·n tokens). The
number of chunks is fixed (--max-token-length / 75, kohya's `tokenizer_max_length`): a short caption gets empty
chunks [BOS, EOS, padding], as kohya gives it, so every caption has the same length and batches and caches stay
rectangular. Two choices differ from one of them: A1111 breaks a chunk at the last comma within its last 20
tokens (`comma_padding_backtrack`); sdlora cuts every 75 tokens, as kohya does. kohya drops the inner chunks'
BOS/EOS states (1 + 75·n + 1 tokens); sdlora keeps them (77·n), as A1111, Forge and ComfyUI condition at
inference. The pooled output (SDXL's bigG) is the first chunk's, as kohya (`pool2[::n_size]`) and A1111 take it.
Hand-written: transformers' CLIP reads at most 77 positions and neither diffusers nor transformers chunk.
"""

from __future__ import annotations

import dataclasses

import torch

from sdlora.errors import SdloraError
from sdlora.lora.tokens import expand
from sdlora.train.option_checks import CHUNK, chunks


def apply(cfg, base):
    """`base.spec` with the run's clip skip and chunks on its CLIP encoders; one-line errors where the family has
    no CLIP hidden states to skip in (FLUX.1), reads the penultimate layer already (clip skip 1), has fewer layers,
    or reads long prompts with T5 (SD 3.x, FLUX.1: --max-token-length does not apply)."""
    spec, n = base.spec, chunks(cfg)
    if cfg.clip_skip is None and n == 1:
        return spec
    clips = spec.clip_hidden()
    if cfg.clip_skip is not None:
        check_clip_skip(spec, {t.attr: base.modules[t.attr] for t in clips}, cfg.clip_skip)
    if n > 1 and (not clips or any(t.sequence_join for t in spec.text_encoders)):
        raise SdloraError(f"--max-token-length {cfg.max_token_length} does not apply to {spec.label}: its T5 encoder "
                          "reads long prompts (see --t5xxl-max-token-length); drop --max-token-length")
    names = {t.component for t in clips}
    return dataclasses.replace(spec, text_encoders=tuple(
        dataclasses.replace(t, clip_skip=cfg.clip_skip, chunks=n) if t.component in names else t
        for t in spec.text_encoders))


def check_clip_skip(spec, encoders: dict, n: int, flag: str = "--clip-skip") -> None:
    """Refuse clip skip `n` where it cannot apply to family `spec` with text encoders `encoders` ({attr: module})."""
    clips = spec.clip_hidden()
    if not clips:
        raise SdloraError(f"{flag} does not apply to {spec.label}: it conditions on no CLIP hidden states (only "
                          "CLIP-L's pooled output); drop it")
    if clips[0].hidden == "penultimate" and n < 2:
        raise SdloraError(f"{flag} {n}: {spec.label} reads the penultimate CLIP layer already (clip skip 2); use 2 "
                          "or more, or leave it out")
    for t in clips:
        layers = encoders[t.attr].config.num_hidden_layers
        if n > layers:
            raise SdloraError(f"{flag} {n} is more than the {layers} layers of {spec.label}'s {t.attr}; use at most "
                              f"{layers}")


def token_ids(tok, prompts: list[str], t) -> torch.Tensor:
    """[B, 77] token ids (one chunk: the tokenizer's own padding and truncation), or [B, n, 77] in A1111's chunks;
    new tokens of --pivotal expanded first (`lora.tokens.expand`)."""
    prompts = expand(tok, prompts)
    if t.chunks == 1:
        n = min(t.max_length or tok.model_max_length, tok.model_max_length)
        return tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    width = tok.model_max_length - 2  # 75
    rows = []
    for ids in tok(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids:
        chunk_rows = []
        for i in range(t.chunks):
            part = ids[i * width:(i + 1) * width]
            chunk_rows.append([tok.bos_token_id] + part + [tok.eos_token_id] + [tok.pad_token_id] * (width - len(part)))
        rows.append(chunk_rows)
    return torch.tensor(rows)


def _final_norm(te):
    """The encoder's final layer norm: transformers 5's CLIPTextModel holds it itself, the projection models (and
    transformers 4) in `text_model`; a DDP wrapper (several processes training it) in `module`."""
    inner = getattr(te, "module", te)
    return getattr(inner, "final_layer_norm", None) or inner.text_model.final_layer_norm


def encode_clip(t, tok, te, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden states or None, pooled output or None) of CLIP encoder `te` (spec `t`) for `prompts`, at its layer
    (clip skip) and in its chunks, as the module docstring says."""
    ids = token_ids(tok, prompts, t).to(next(te.parameters()).device)
    b = len(prompts)
    flat = ids.reshape(-1, ids.shape[-1])
    skip = t.clip_skip
    default = skip is None or (t.hidden == "final" and skip == 1) or (t.hidden == "penultimate" and skip == 2)
    out = te(flat, output_hidden_states=t.hidden == "penultimate" or not default)
    hidden = None
    if t.hidden == "final":
        hidden = out[0] if default else _final_norm(te)(out.hidden_states[-skip])
    elif t.hidden == "penultimate":
        hidden = out.hidden_states[-2 if default else -skip]
    if hidden is not None:
        hidden = hidden.reshape(b, -1, hidden.shape[-1])
    pooled = getattr(out, t.pooled_from) if t.pooled else None
    if pooled is not None and t.chunks > 1:
        pooled = pooled.reshape(b, t.chunks, -1)[:, 0]  # the first chunk's
    return hidden, pooled


def token_limit(t, tok) -> int:
    """How many tokens (with BOS/EOS) of a caption encoder `t` reads."""
    n = min(t.max_length or tok.model_max_length, tok.model_max_length)
    return CHUNK * t.chunks + 2 if t.kind == "clip" and t.chunks > 1 else n
