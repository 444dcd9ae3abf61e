"""Fusing a blend of adapters into a model's weights, A1111-style: W = W0 + Σ_i s_i · ΔW_i, with a separate strength
for the UNet and for the text encoder(s) of each adapter. N adapters cost no time per denoising step.

Fusion is hand-written rather than diffusers' `load_lora_weights` + `set_adapters`, because diffusers' kohya
loader rejects valid kohya files (a text-encoder part with only q/k/v projections: "Could not automatically
infer state dict type", shared/KOHYA_FORMAT.md §6) which kohya, A1111 and ComfyUI load, and because PEFT's
weighted mix has not matched A1111's sum of deltas (huggingface/peft#643). Every adapter is read once (into the
neutral `AdapterFile`); each strength change recomputes the touched weights from a CPU fp32 backup of the
original weights, so moving a slider reads nothing from disk and repeated changes never drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora import archs
from sdlora.errors import SdloraError
from sdlora.formats import layouts
from sdlora.formats.adapter import AdapterFile, AdapterModule


@dataclass
class Resolved:
    """An adapter matched against one loaded model."""

    file: AdapterFile
    targets: dict[tuple[str, str], AdapterModule]  # (component, module path in the model) -> module
    unmatched: list[str]  # module names (and unknown keys) that match no module of the model


class Blender:
    """Fuses Σ s_i·ΔW_i of the added adapters into a model's weights; strengths change without disk reads."""

    def __init__(self, base):
        self.base = base
        self.table = layouts.model_table(base.components, base.arch)
        self.adapters: dict[str, Resolved] = {}
        self.backup: dict[tuple[str, str], torch.Tensor] = {}  # original weight, CPU fp32, of every touched module
        self.strengths: dict[str, tuple[float, float]] = {}  # adapter name -> (text encoder, unet), as fused now

    def _module(self, key: tuple[str, str]) -> torch.nn.Module:
        return self.base.components[key[0]].get_submodule(key[1])

    def add(self, f: AdapterFile) -> Resolved:
        """Match `f` to the model (refusing another family, a file matching nothing, or wrong shapes); strength 0."""
        base = self.base
        where = f.path.name if f.path else f.name
        if not archs.fits(f.arch, base.arch):
            raise SdloraError(
                f"{where}: this adapter is for {archs.label(f.arch)} (base version "
                f"{f.base_version or 'from its key names'}), the model '{base.name}' is {archs.label(base.arch)}; "
                "pick an adapter trained for this model")
        targets, unmatched = {}, list(f.unknown)
        for name, m in f.modules.items():
            hit = self.table.get(name)
            if hit is None:
                unmatched.append(name)
                continue
            if m.shape != hit.shape:
                raise SdloraError(f"{where}: module {name} has shape {list(m.shape)} but the model's is "
                                  f"{list(hit.shape)}; the adapter was trained for a different model (size) than "
                                  f"'{base.name}': use it with the model it was trained on")
            targets[(hit.component, hit.module_path)] = m
        if not targets:
            raise SdloraError(f"{where}: none of its {len(f.modules)} modules matches a module of '{base.name}' "
                              f"({archs.label(base.arch)}); it is not a LoRA for this model")
        name, n = f.name, 2
        while name in self.adapters:
            name, n = f"{f.name}-{n}", n + 1
        f.name = name
        for key in targets:
            if key not in self.backup:
                self.backup[key] = self._module(key).weight.detach().to("cpu", torch.float32, copy=True)
        r = Resolved(f, targets, unmatched)
        self.adapters[name] = r
        self.strengths[name] = (0.0, 0.0)
        return r

    def set_strengths(self, strengths: dict[str, float | tuple[float, float]]) -> None:
        """Fuse W = W0 + Σ s_i·ΔW_i. `strengths`: name -> s (both parts) or (text encoder, unet); absent = 0.

        Only the modules of adapters whose strength changed are recomputed, each from its fp32 backup.
        """
        unknown = set(strengths) - set(self.adapters)
        if unknown:
            raise SdloraError(f"unknown adapter(s) {sorted(unknown)}; loaded: {sorted(self.adapters)}")
        new = {}
        for name in self.adapters:
            s = strengths.get(name, 0.0)
            te, unet = (s, s) if isinstance(s, (int, float)) else s
            new[name] = (float(te), float(unet))
            for v in new[name]:
                if not math.isfinite(v):
                    raise SdloraError(f"strength of {name} must be a finite number, got {v}")
        changed = [n for n in self.adapters if new[n] != self.strengths[n]]
        dirty = {k for n in changed for k in self.adapters[n].targets}
        denoiser = self.base.spec.denoiser
        with torch.no_grad():
            for key in dirty:
                weight = self._module(key).weight
                dev = weight.device  # fp32 arithmetic where the weight lives (the GPU, when there is one)
                w = self.backup[key].to(dev, copy=True)
                for name, r in self.adapters.items():
                    s = new[name][1] if key[0] == denoiser else new[name][0]
                    if s != 0.0 and key in r.targets:
                        w += s * r.targets[key].delta(dev)
                weight.copy_(w.to(weight.dtype))
        self.strengths = new

    def active(self) -> list[tuple[Resolved, float, float]]:
        """Adapters fused with a non-zero strength: (adapter, text-encoder strength, unet strength)."""
        return [(self.adapters[n], te, u) for n, (te, u) in self.strengths.items() if te != 0.0 or u != 0.0]
