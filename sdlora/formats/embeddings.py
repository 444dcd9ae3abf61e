"""Learnt token embeddings (pivotal tuning, `--pivotal`) in files: bundled in the LoRA file as A1111 reads them, and
as a separate embedding file that A1111, ComfyUI (`embedding:name`) and diffusers' `load_textual_inversion` read.

The neutral form is `{name: {kohya text-encoder component: tensor [vectors, width]}}` ("te" for one-encoder
families, "te1"/"te2" for the CLIP-L/bigG encoders of SDXL and SD 3.x, "te1" for FLUX.1's CLIP-L).

Keys, as the readers expect them:
- in a LoRA file (A1111 `extensions-builtin/Lora/networks.py`, `load_network`: a key whose part before the first
  "." is `bundle_emb` is split into the embedding name and the rest; a rest starting with `string_to_param.` becomes
  `{"string_to_param": {k: tensor}}`, any other rest is kept under its own name; the dict then goes to
  `textual_inversion.create_embedding_from_data`): `bundle_emb.<name>.string_to_param.*` for a one-encoder family,
  `bundle_emb.<name>.clip_l` / `.clip_g` otherwise (that function's SDXL form needs both).
- in an embedding file: `emb_params` (kohya's name; a file of one tensor, which A1111 reads as a "diffusers concept",
  ComfyUI takes as its only value and diffusers as its only entry) for a one-encoder family; `clip_l` / `clip_g`
  (A1111's SDXL form; ComfyUI's `embedding_key` of each encoder; diffusers: `load_textual_inversion(sd["clip_g"],
  text_encoder=pipe.text_encoder_2, ...)`, as its docs show) otherwise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sdlora.errors import SdloraError

if TYPE_CHECKING:  # light at import: sdlora.config checks names with `check_name` (no torch)
    import torch

BUNDLE = "bundle_emb"
STRING_TO_PARAM = "string_to_param"
SINGLE = "te"  # the component of a one-encoder family
SINGLE_FILE_KEY = "emb_params"
# component -> key of its vectors, for families with more than one text encoder (the first CLIP is CLIP-L)
ENCODER_KEYS = {"te1": "clip_l", "te2": "clip_g"}
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # no "." (A1111 splits keys on it), no spaces, lower case (CLIP's)


def check_name(name: str, flag: str = "--trigger") -> str:
    if not NAME.match(name or ""):
        raise SdloraError(f"{flag} {name!r}: an embedding name must be one lower-case word of letters, digits, '_' or "
                          "'-' (A1111 and ComfyUI find the embedding by it), e.g. 'ohwx'")
    return name


def _key(component: str) -> str:
    if component == SINGLE:
        return f"{STRING_TO_PARAM}.*"
    if component not in ENCODER_KEYS:
        raise SdloraError(f"no embedding key for text encoder {component!r} (only CLIP encoders learn tokens)")
    return ENCODER_KEYS[component]


def to_bundle(embeddings: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` tensors of `embeddings` for a LoRA file."""
    return {f"{BUNDLE}.{name}.{_key(c)}": t.contiguous() for name, vecs in embeddings.items() for c, t in vecs.items()}


def split_bundle(tensors: dict[str, torch.Tensor], where: str = "<tensors>") -> tuple[dict, dict]:
    """(the other tensors, the bundled embeddings in the neutral form), parsing names as A1111 does."""
    rest, out = {}, {}
    by_key = {v: c for c, v in ENCODER_KEYS.items()}
    for k, t in tensors.items():
        head, _, part = k.partition(".")
        if head != BUNDLE:
            rest[k] = t
            continue
        name, _, vec = part.partition(".")
        if vec.split(".")[0] == STRING_TO_PARAM:
            comp = SINGLE
        elif vec in by_key:
            comp = by_key[vec]
        else:  # a layout sdlora does not read: kept, and reported with the file's other unknown keys
            rest[k] = t
            continue
        out.setdefault(name, {})[comp] = t
    for name, vecs in out.items():
        check(name, vecs, where)
    return rest, out


def check(name: str, vecs: dict[str, torch.Tensor], where: str) -> None:
    """One line for an embedding no reader can use: not 2-d, encoders with different token counts, NaN/Inf, or an
    SDXL-style pair with one half missing."""
    counts = {t.shape[0] if t.dim() == 2 else -1 for t in vecs.values()}
    if -1 in counts or len(counts) != 1:
        shapes = ", ".join(f"{c} {list(t.shape)}" for c, t in vecs.items())
        raise SdloraError(f"{where}: embedding {name!r} has shapes {shapes}; each encoder's vectors must be "
                          "[tokens, width] with the same token count; the file is damaged, re-export it")
    if SINGLE not in vecs and len(vecs) == 1 and "te2" in vecs:
        raise SdloraError(f"{where}: embedding {name!r} has clip_g without clip_l (A1111 needs both)")
    for c, t in vecs.items():
        if not t.float().isfinite().all():
            raise SdloraError(f"{where}: embedding {name!r} holds NaN or Inf values ({c}); retrain or re-export it")


def to_file(vecs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a separate embedding file for one embedding."""
    if SINGLE in vecs:
        return {SINGLE_FILE_KEY: vecs[SINGLE].contiguous()}
    return {_key(c): t.contiguous() for c, t in vecs.items()}


def from_file(tensors: dict[str, torch.Tensor], where: str = "<tensors>") -> dict[str, torch.Tensor]:
    """The neutral vectors of an embedding file in any layout `to_file` writes or A1111/diffusers write (a single
    tensor under any name, `string_to_param.*`, or `clip_l`/`clip_g`)."""
    by_key = {v: c for c, v in ENCODER_KEYS.items()}
    if set(tensors) & set(by_key):
        vecs = {by_key[k]: t for k, t in tensors.items() if k in by_key}
    elif len(tensors) == 1:
        t = next(iter(tensors.values()))
        vecs = {SINGLE: t if t.dim() == 2 else t.reshape(1, -1)}
    else:
        raise SdloraError(f"{where}: not an embedding file (keys {', '.join(sorted(tensors)[:4])}); an embedding "
                          "holds one tensor, or clip_l and clip_g")
    check("embedding", vecs, where)
    return vecs


def describe(embeddings: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """One line per embedding: its name, tokens and widths per encoder file key."""
    return [f"{name}: {next(iter(v.values())).shape[0]} token(s) ("
            + ", ".join(f"{_key(c).split('.')[0]} {t.shape[1]}" for c, t in v.items()) + ")"
            for name, v in embeddings.items()]


def file_path(lora_path, name: str):
    """Where a LoRA file's embedding `name` is written: `<lora stem>-embeddings/<name>.safetensors` beside it (the
    file name is what A1111 and ComfyUI call the embedding)."""
    from pathlib import Path

    lora_path = Path(lora_path)
    return lora_path.with_name(f"{lora_path.stem}-embeddings") / f"{name}.safetensors"


def save_file(vecs: dict, path, metadata: dict[str, str] | None = None):
    """Write one embedding file atomically (`to_file`'s layout), with the LoRA's family metadata."""
    from pathlib import Path

    from sdlora.formats import file_io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "modelspec.trigger_phrase")
    md = {k: v for k, v in (metadata or {}).items() if k in keep}
    file_io.atomic_save(to_file(vecs), path, md)
    return path
