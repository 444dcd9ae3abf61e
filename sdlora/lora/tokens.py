"""New tokens in a CLIP text encoder: what pivotal tuning trains (`sdlora/train/pivotal.py`) and what `generate`, the
app and the toy judge load from a LoRA file's bundled embeddings (`infer/blend.py`).

A word `name` learnt as N vectors becomes the tokens `name`, `name_1`, ..., `name_{N-1}` of the tokenizer, and a
prompt's `name` expands to all of them before tokenizing: exactly diffusers' `load_textual_inversion` naming and its
`maybe_convert_prompt` expansion (which `expand` calls), so the diffusers pipelines that expand prompts themselves
(SD 1.x/2.x, SDXL, FLUX.1) see the same ids as training.

The vectors are a separate parameter (`NewTokens`) in front of the untouched embedding table, not new rows of a
resized table with a gradient mask: the base vocabulary cannot change (no optimizer, weight decay or precision cast
ever reaches it: it is the same tensor object), the optimizer holds N×width values rather than the whole table
(49408×1280 for bigG), and taking the tokens out again (`detach`) is putting the old module back.

The base tokenizer is never changed: the tokenizer gets the new tokens on a copy, put in the model's place while the
tokens are attached. CLIP configs with the legacy `eos_token_id` 2 (SD 1.5's, SDXL's, SD 3.5's, FLUX.1's) pool at
the largest token id, which new tokens (ids above the vocabulary) would take: while attached, the encoder pools at
the first end-of-text token, which for prompts without new tokens is the same position, and is where A1111 and
ComfyUI pool.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class NewTokens(nn.Module):
    """An input embedding: the frozen `base` table for ids it has, the trainable `vectors` for the new `ids`."""

    def __init__(self, base: nn.Embedding, ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device), persistent=False)
        self.vectors = nn.Parameter(vectors.detach().to(base.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # what `get_input_embeddings().weight` readers look at
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        hit = input_ids[..., None] == self.ids  # [..., N]
        new = hit.to(self.vectors.dtype) @ self.vectors  # each new token's vector, zero elsewhere
        return torch.where(hit.any(-1, keepdim=True), new.to(out.dtype), out)


def token_names(name: str, n: int) -> list[str]:
    """diffusers' multi-vector token names: `name`, `name_1`, ..., `name_{n-1}`."""
    return [name] + [f"{name}_{i}" for i in range(1, n)]


def expand(tokenizer, prompts: list[str]) -> list[str]:
    """Prompts with each attached name expanded to its N tokens (diffusers' own expansion), for a tokenizer that
    carries new tokens; other tokenizers' prompts pass unchanged."""
    if not getattr(tokenizer, "sdlora_names", None):
        return prompts
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    # `_maybe_convert_prompt` uses no pipeline state (only the tokenizer): the very rule the pipelines apply
    return [TextualInversionLoaderMixin._maybe_convert_prompt(None, p, tokenizer) for p in prompts]


def pipeline_prompts(pipe, spec, tokenizers: dict, prompt: str, negative: str | None) -> dict:
    """What to pass a diffusers pipeline for `prompt` (and `negative`) with new tokens attached: the prompt as it is
    when the pipeline expands it itself (TextualInversionLoaderMixin: SD 1.x/2.x, SDXL, FLUX.1); otherwise (SD 3.x)
    one prompt per text encoder (`prompt`, `prompt_2`, ...), expanded for the CLIP ones and plain for T5-XXL."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    out = {"prompt": prompt} | ({"negative_prompt": negative} if negative is not None else {})
    if isinstance(pipe, TextualInversionLoaderMixin):
        return out
    for i, t in enumerate(spec.text_encoders):
        key = "prompt" if i == 0 else f"prompt_{i + 1}"
        out[key] = expand(tokenizers[t.tokenizer_attr], [prompt])[0]
        if negative is not None:
            out[f"negative_{key}"] = expand(tokenizers[t.tokenizer_attr], [negative])[0]
    return out


class Attached:
    """New tokens attached to a base model's CLIP encoders; `detach()` restores the model exactly."""

    def __init__(self, base, spec_encoders, vectors: dict[str, dict[str, torch.Tensor]]):
        """`vectors`: {name: {kohya component: [N, width]}}; `spec_encoders`: the family's TextEncoderSpecs."""
        self.base, self.undo = base, []
        self.params: dict[str, nn.Parameter] = {}  # component -> its new tokens' vectors (what training trains)
        for t in spec_encoders:
            mine = {name: v[t.component] for name, v in vectors.items() if t.component in v}
            if not mine:
                continue
            te, tok = base.modules[t.attr], base.tokenizers[t.tokenizer_attr]
            new_tok = copy.deepcopy(tok)
            for name, vec in mine.items():
                new_tok.add_tokens(token_names(name, vec.shape[0]))
            new_tok.sdlora_names = tuple(mine) + tuple(getattr(tok, "sdlora_names", ()))
            emb = te.get_input_embeddings()
            ids = [new_tok.convert_tokens_to_ids(x) for name, vec in mine.items() for x in token_names(name,
                                                                                                       vec.shape[0])]
            wrapper = NewTokens(emb, ids, torch.cat(list(mine.values())))
            te.set_input_embeddings(wrapper)
            self.params[t.component] = wrapper.vectors
            text = getattr(te, "text_model", te)
            old_eos = getattr(text, "eos_token_id", None)
            if old_eos == 2:
                text.eos_token_id = new_tok.eos_token_id
            base.tokenizers[t.tokenizer_attr] = new_tok
            self.undo.append((t, te, tok, emb, text, old_eos, wrapper, {n: v.shape[0] for n, v in mine.items()}))

    def vectors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {component: [N, width]}} as they are now (fp32 copies, on the CPU)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for t, _, _, _, _, _, wrapper, counts in self.undo:
            chunks = wrapper.vectors.detach().float().cpu().split(list(counts.values()))
            for name, v in zip(counts, chunks):
                out.setdefault(name, {})[t.component] = v.clone()
        return out

    def encoders(self) -> dict[str, nn.Module]:
        """{component: text encoder} of the encoders carrying new tokens."""
        return {t.component: te for t, te, *_ in self.undo}

    def wrappers(self) -> dict[str, NewTokens]:
        return {t.component: w for t, _, _, _, _, _, w, _ in self.undo}

    def detach(self) -> None:
        for t, te, tok, emb, text, old_eos, _, _ in reversed(self.undo):
            te.set_input_embeddings(emb)
            if old_eos is not None:
                text.eos_token_id = old_eos
            self.base.tokenizers[t.tokenizer_attr] = tok
        self.undo = []
