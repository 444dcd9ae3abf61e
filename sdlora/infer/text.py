"""The prompt arguments of a diffusers pipeline call, conditioned as `sdlora train` conditions: what `generate`, the
app, sample grids and class images pass instead of a bare prompt.

Where nothing differs from the family's default, the prompt goes to the pipeline as text. With a clip skip (given, or
the run's, set on the spec by sdlora/train/long_prompts.py) or long-prompt chunks:
- SD 1.x/2.x (conditioned on the last CLIP layer): the prompt and the negative prompt are encoded here by
  `step.encode_text`, the training code itself, and passed as `prompt_embeds` / `negative_prompt_embeds` (A1111 skips
  the layers for both). Hand-written because diffusers' own `clip_skip` reads `text_encoder.text_model`, which
  transformers 5's CLIPTextModel no longer has (it fails), and because diffusers does not chunk long prompts.
- SDXL, SD 3.x (conditioned on the penultimate layer): diffusers' `clip_skip` (N - 2), which reads the same layer as
  training for the prompt; diffusers leaves the negative prompt at the penultimate layer, and truncates prompts at 77
  tokens (long-prompt chunks apply to training only there).
"""

from __future__ import annotations

import dataclasses

import torch

from sdlora.train.long_prompts import check_clip_skip
from sdlora.train.step import encode_text


def prompt_args(base, prompt: str, negative: str | None = None, clip_skip: int | None = None,
                text: dict | None = None) -> dict:
    """Keyword arguments for `base`'s pipeline: its text arguments `text` (default: `prompt`, and `negative_prompt`
    when given; pivotal tuning's per-encoder prompts, `lora.tokens.pipeline_prompts`), or the embeddings of `prompt`
    and `negative`, with clip skip `clip_skip` (default: the one set on `base.spec` by a training run)."""
    spec = base.spec
    clips = spec.clip_hidden()
    if clip_skip is not None:
        check_clip_skip(spec, {t.attr: base.modules[t.attr] for t in clips}, clip_skip, "clip skip")
        spec = dataclasses.replace(spec, text_encoders=tuple(
            dataclasses.replace(t, clip_skip=clip_skip) if t in clips else t for t in spec.text_encoders))
        clips = spec.clip_hidden()
    if text is None:
        text = {"prompt": prompt} | ({"negative_prompt": negative} if negative is not None else {})
    k = spec.pipeline_clip_skip()
    chunked = any(t.chunks > 1 for t in clips)
    if not clips or (k is None and not chunked):
        return text
    if clips[0].hidden == "penultimate":
        return text | ({"clip_skip": k} if k is not None else {})
    encoders = list(base.text_encoders.values())
    with torch.no_grad():
        h, _ = encode_text(spec, encoders, [prompt])
        hn, _ = encode_text(spec, encoders, [negative or ""])
    return {"prompt_embeds": h, "negative_prompt_embeds": hn}
