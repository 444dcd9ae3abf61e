"""The neutral adapter model: what every reader returns and every writer takes, whoever wrote the file.

An `AdapterFile` is a set of `AdapterModule`s, each named by its canonical kohya module name (`lora_unet_…`,
`lora_te_…`: the name every loader matches and the one key space shared by kohya, LyCORIS, diffusers and PEFT
files once read), with its kind (a name in `sdlora.lora.kinds.KINDS`: lora, locon, loha, lokr, dora, full), its
tensors by role, and its alpha (None when the file had none).
Roles per kind (key names are `formats/kohya.py`'s): lora / locon / dora: down, up (+ mid for Tucker LoCon); loha:
w1a, w1b, w2a, w2b (+ t1, t2); lokr: w1 | w1a, w1b and w2 | w2a, w2b (+ t2); full: diff (+ diff_b). Any kind but
full may carry `magnitude` (DoRA's `dora_scale`); a lora/locon module that does is of kind "dora". Each kind's
record (`AdapterModule.kind_spec`, sdlora/lora/kinds/) holds its rank, scale, shape and ΔW formula. Parsing files
into it is in `formats/read.py`; writing it back in `formats/kohya.py` and `formats/convert.py`. The delta ΔW of a
module is `AdapterModule.delta()`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.lora import kinds
from sdlora.lora.kinds.dora import dora_delta


@dataclass
class AdapterModule:
    name: str  # canonical kohya module name
    kind: str  # a name in sdlora.lora.kinds.KINDS
    tensors: dict[str, torch.Tensor]  # by role (see the module docstring)
    alpha: float | None  # None: the file had none (every loader then uses scale 1)

    @property
    def kind_spec(self) -> kinds.KindSpec:
        """The record of its kind: roles, rank, scale, shape and ΔW formula (sdlora/lora/kinds/)."""
        return kinds.get(self.kind)

    @property
    def rank(self) -> int:
        """r of alpha/r; for a full diff or a LoKr with two full factors (scale 1), the rank bound min(out, in)."""
        r = self.kind_spec.rank(self.tensors)
        if r is not None:
            return r
        s = self.shape
        return int(min(s[0], math.prod(s[1:])))

    @property
    def scale(self) -> float:
        """The factor every loader applies to ΔW: alpha/r, 1 for a full diff and a LoKr with two full factors."""
        return self.kind_spec.scale(self.alpha, self.tensors)

    @property
    def dora(self) -> bool:
        return "magnitude" in self.tensors

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the base weight the module adapts; for a plain LoHa/LoKr conv, whose factors are 2-D, the
        flattened [out, in·kh·kw] (compare with `fits`)."""
        return self.kind_spec.shape(self.tensors)

    def fits(self, shape) -> bool:
        """Can the delta be applied to a weight of `shape` (as loaders do: reshaped to it when the counts agree)?"""
        own, shape = tuple(self.shape), tuple(shape)
        if own == shape:
            return True
        flat = len(own) == 2 and self.kind_spec.flat_conv
        return flat and len(shape) == 4 and own == (shape[0], math.prod(shape[1:]))

    @property
    def conv(self) -> bool:
        return len(self.shape) == 4

    def delta(self, device=None, base: torch.Tensor | None = None) -> torch.Tensor:
        """What W0 + s·delta fuses at strength s, in fp32, shaped like the base weight (`base`'s shape when given),
        computed on `device` (default: where the tensors are). scale·ΔW for every kind; with DoRA, the loaders'
        D(W0 + scale·ΔW) − W0, which needs the base weight `base`."""
        t = self.tensors if device is None else {k: v.to(device) for k, v in self.tensors.items()}
        d = self._scaled(t)
        if base is not None:
            d = d.reshape(base.shape)
        elif len(d.shape) != len(self.shape):
            d = d.reshape(self.shape)
        if self.dora:
            if base is None:
                raise SdloraError(f"module {self.name} is DoRA: its delta depends on the base weight; pass it")
            d = dora_delta(base.to(d.device), d, t["magnitude"])
        return d

    def _scaled(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """scale·ΔW without DoRA, in the shape the kind's formula gives (2-D for a plain LoHa/LoKr conv)."""
        return self.kind_spec.delta(t, self.alpha)

    def bias_delta(self) -> torch.Tensor | None:
        """A full diff's bias delta (`diff_b`), added to the layer's bias at the same strength; None for others."""
        return self.tensors.get("diff_b")

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


@dataclass
class AdapterFile:
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "kohya"  # the layout it was read from: "kohya", "diffusers", "peft", "sdlora" (trained here)
    arch: str | None = None  # the family it is for (metadata, names or shapes), None when nothing says
    unknown: list[str] = field(default_factory=list)  # keys that are not parts of a module sdlora can apply
    path: Path | None = None
    name: str = ""  # file stem: what `<lora:name:s>` refers to
    notes: list[str] = field(default_factory=list)  # what the reader assumed (e.g. alpha taken as rank)
    # learnt token embeddings bundled with the LoRA (A1111's `bundle_emb.*`, formats/embeddings.py):
    # {name: {text-encoder component: [tokens, width]}}
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """The name A1111 and the app give it: the file's stem, or a PEFT folder's name."""
        if self.path is None:
            return self.name
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def trigger(self) -> str:
        return self.metadata.get("modelspec.trigger_phrase", "")

    @property
    def base_version(self) -> str:
        return self.metadata.get("ss_base_model_version") or self.metadata.get("modelspec.architecture", "")

    @property
    def short_hash(self) -> str:
        """A1111's Lora hash: kohya's `sshs_model_hash`[:12], else the sha256 of the file's bytes[:12]."""
        short = self.metadata.get("sshs_model_hash", "")[:12]
        if short or self.path is None:
            return short
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        return h.hexdigest()[:12]


def check_module(m: AdapterModule, where: str) -> None:
    """Refuse a module no loader can apply correctly, with one line: rank 0, wrong dimensions, factors whose
    ranks or shapes disagree, a non-scalar or non-finite alpha, NaN/Inf values."""
    def bad(why: str) -> SdloraError:
        return SdloraError(f"{where}: module {m.name} {why}; the file is damaged or not a LoRA, re-export or "
                           "retrain it")

    t = m.tensors
    spec = kinds.KINDS.get(m.kind)
    if spec is None:
        raise bad(f"has kind {m.kind!r}")
    missing = spec.missing(t)
    if missing:
        raise bad(f"lacks its {', '.join(missing)} weight(s)")
    why = _pair_problem(t) if spec.pair else spec.problem(t, m.alpha)
    if why:
        raise bad(why)
    if m.dora:
        mag, shape = t["magnitude"], m.shape
        flat_in = math.prod(shape[1:]) if spec.flat_conv and len(shape) == 2 else shape[1]
        if mag.numel() not in (shape[0], shape[1], flat_in) or mag.dim() not in (2, 4):
            raise bad(f"has a DoRA scale {list(mag.shape)} that fits neither axis of {list(shape)}")
    if m.alpha is not None and not math.isfinite(m.alpha):
        raise bad(f"has alpha {m.alpha}")
    for role, v in t.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise bad(f"holds NaN or Inf values in its {role} weight")


def _pair_problem(t: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a down/up pair (lora, locon, dora; here, as the messages name kohya's keys), None if sound."""
    down, up = t["down"], t["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return f"has down {list(down.shape)} / up {list(up.shape)}: a LoRA pair is 2-d (Linear) or 4-d (conv)"
    if down.shape[0] < 1:
        return "has rank 0"
    if up.shape[1] != down.shape[0]:
        return f"has rank {down.shape[0]} in lora_down but {up.shape[1]} in lora_up"
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"has an up weight {list(up.shape)}: only 1x1 up convolutions exist"
    if "mid" in t and (t["mid"].dim() != 4 or tuple(t["mid"].shape[:2]) != (down.shape[0], down.shape[0])):
        return f"has a Tucker core {list(t['mid'].shape)} for rank {down.shape[0]}"
    return None
