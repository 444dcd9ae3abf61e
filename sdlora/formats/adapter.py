"""The neutral adapter model: what every reader returns and every writer takes, whoever wrote the file.

An `AdapterFile` is a set of `AdapterModule`s, each named by its canonical kohya module name (`lora_unet_…`,
`lora_te_…`: the name every loader matches and the one key space shared by kohya, LyCORIS, diffusers and PEFT
files once read), with its kind (`lora` today; `locon`, `loha`, `lokr`, `dora`, `full` have room), its tensors by
role, and its alpha (None when the file had none). Parsing files into it is in `formats/read.py`; writing it back
in `formats/kohya.py` and `formats/convert.py`. The delta ΔW of a module is `AdapterModule.delta()`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.lora.math import lora_delta, lora_delta_shape, lora_scale

KINDS = ("lora", "locon", "loha", "lokr", "dora", "full")


@dataclass
class AdapterModule:
    name: str  # canonical kohya module name
    kind: str  # one of KINDS
    tensors: dict[str, torch.Tensor]  # by role: "down" [r, in(, k, k)], "up" [out, r(, 1, 1)] for lora
    alpha: float | None  # None: the file had none (every loader then uses scale 1)

    @property
    def rank(self) -> int:
        return int(self.tensors["down"].shape[0])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the base weight the module adapts."""
        return lora_delta_shape(self.tensors["down"], self.tensors["up"])

    @property
    def conv(self) -> bool:
        return self.tensors["down"].dim() == 4

    def delta(self, device=None) -> torch.Tensor:
        """ΔW = (alpha/r)·up·down in fp32, shaped like the base weight, computed on `device` (default: where the
        tensors are)."""
        t = self.tensors if device is None else {k: v.to(device) for k, v in self.tensors.items()}
        return lora_delta(t["down"], t["up"], self.alpha)

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
    """Refuse a module no loader can apply correctly, with one line: rank 0, wrong dimensions, up/down ranks that
    differ, a non-scalar or non-finite alpha, NaN/Inf values."""
    down, up = m.tensors.get("down"), m.tensors.get("up")

    def bad(why: str) -> SdloraError:
        return SdloraError(f"{where}: module {m.name} {why}; the file is damaged or not a LoRA, re-export or "
                           "retrain it")

    if down is None or up is None:
        raise bad("lacks its down or up weight")
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise bad(f"has down {list(down.shape)} / up {list(up.shape)}: a LoRA pair is 2-d (Linear) or 4-d (conv)")
    if down.shape[0] < 1 or up.shape[1] != down.shape[0]:
        raise bad(f"has rank {down.shape[0]} in lora_down but {up.shape[1]} in lora_up"
                  if down.shape[0] >= 1 else "has rank 0")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise bad(f"has an up weight {list(up.shape)}: only 1x1 up convolutions exist")
    if m.alpha is not None and not math.isfinite(m.alpha):
        raise bad(f"has alpha {m.alpha}")
    for role, t in m.tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise bad(f"holds NaN or Inf values in its {role} weight")
