"""The adapter-kind registry: one `KindSpec` per kind (lora.py, locon.py, loha.py, lokr.py, dora.py, full.py), as
`sdlora/archs/` holds one `ArchSpec` per model family.

A kind's module holds what makes it that kind: its roles and ΔW formula (the file side: rank, scale, shape, delta,
what a sound module holds), how it is trained (its PEFT or LyCORIS layers: inject, find, collect), its `--network`
help and its LyCORIS network args. Code elsewhere asks the record (`kinds.get(name)`, `AdapterModule.kind_spec`);
it never compares kind names. Key names stay in sdlora/formats/: `formats/kohya.py`'s ROLE_SUFFIX gives each
record's key suffix per role.

A new kind: a module beside lora.py with its `SPEC`, one line in `KINDS` below, its key suffixes in
formats/kohya.py's ROLE_SUFFIX, and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdlora.errors import SdloraError
from sdlora.lora.kinds import dora, full, locon, loha, lokr, lora
from sdlora.lora.kinds.base import ADAPTER, KindSpec, Placement
from sdlora.lora.kinds.lora import pair_kind

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER", "KindSpec", "Placement", "KINDS", "NETWORKS", "DORA_BASES", "LORA", "LOCON", "LOHA", "LOKR",
           "DORA", "FULL", "get", "trained", "built", "network_help", "lycoris_args", "adapter_layers", "pair_kind"]

KINDS: dict[str, KindSpec] = {k.name: k for k in (lora.SPEC, locon.SPEC, loha.SPEC, lokr.SPEC, dora.SPEC, full.SPEC)}
LORA, LOCON, LOHA, LOKR, DORA, FULL = lora.SPEC, locon.SPEC, loha.SPEC, lokr.SPEC, dora.SPEC, full.SPEC
NETWORKS = tuple(n for n, k in KINDS.items() if k.trainable)  # the `--network` choices
DORA_BASES = tuple(n for n, k in KINDS.items() if k.takes_dora)  # the kinds `--dora` applies to


def get(kind: str) -> KindSpec:
    """The record of kind `kind` ("lora", "loha", ...)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise SdloraError(f"unknown adapter kind {kind!r}; sdlora knows {', '.join(KINDS)}") from None


def trained(kind: str) -> KindSpec:
    """The record of `--network kind`."""
    if kind not in NETWORKS:
        raise SdloraError(f"--network {kind}: use one of {', '.join(NETWORKS)}")
    return KINDS[kind]


def built(net) -> KindSpec:
    """The kind whose layers training injects for `net` (a `sdlora.lora.inject.Network`): DoRA's with `--dora`."""
    return DORA if net.dora else trained(net.kind)


def network_help() -> str:
    """`--network`'s help: every trainable kind in its own words."""
    return ("adapter kind: " + ", ".join(f"{n} ({KINDS[n].help})" for n in NETWORKS)
            + "; LyCORIS layout, read by ComfyUI and A1111")


def lycoris_args(net) -> dict[str, str] | None:
    """The LyCORIS network args (`algo` first, then the kind's own, then DoRA's) of what `net` trains; None when kohya's
    own network module writes it (plain LoRA)."""
    spec = trained(net.kind)
    if spec.kohya_module and not net.dora:
        return None
    args = {"algo": spec.algo} | spec.network_args(net)
    return args | DORA.network_args(net) if net.dora else args


def adapter_layers(model: torch.nn.Module) -> dict[str, tuple[KindSpec, torch.nn.Module]]:
    """{name of the adapted module: (kind, its trained layer)} of `model`. The first kind that claims a module
    has it (lora before locon: the same PEFT layer, whose `collect` tells them apart by shape)."""
    out = {}
    for name, m in model.named_modules():
        for spec in KINDS.values():
            layer = spec.layer_of(m)
            if layer is not None:
                out[name] = (spec, layer)
                break
    return out
