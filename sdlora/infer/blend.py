"""Fusing a blend of adapters into a model's weights, A1111-style: W = W0 + Σ_i s_i · ΔW_i, with a separate strength
for the UNet and for the text encoder(s) of each adapter. N adapters cost no time per denoising step.

Fusion is hand-written rather than diffusers' `load_lora_weights` + `set_adapters`, because diffusers' kohya
loader rejects valid kohya files (a text-encoder part with only q/k/v projections: "Could not automatically
infer state dict type", docs/kohya-format.md §6) which kohya, A1111 and ComfyUI load, and because PEFT's
weighted mix has not matched A1111's sum of deltas (huggingface/peft#643). Every adapter is read once (into the
neutral `AdapterFile`); each strength change recomputes the touched weights from a CPU fp32 backup of the
original weights, so moving a slider reads nothing from disk and repeated changes never drift.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sdlora import archs, bounds
from sdlora.archs.spec import DENOISER
from sdlora.errors import SdloraError
from sdlora.formats import layouts
from sdlora.formats.adapter import AdapterFile, AdapterModule
from sdlora.lora import tokens as T


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
        self.bias_backup: dict[tuple[str, str], torch.Tensor] = {}  # original bias of modules with a bias delta
        self.strengths: dict[str, tuple[float, float]] = {}  # adapter name -> (text encoder, unet), as fused now
        self.entries: dict[tuple[str, str], layouts.Module] = {}  # key -> where its weight is in the model

    def _module(self, key: tuple[str, str]) -> torch.nn.Module:
        return self.base.components[key[0]].get_submodule(key[1])

    def _weight(self, key: tuple[str, str]) -> torch.Tensor:
        """The weight a file module of `key` adapts (SD 3.x / FLUX.1 fused q/k/v: its parts' rows together)."""
        return layouts.weight_of(self.base.components[key[0]], self.entries[key])

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
            if not m.fits(hit.shape):
                raise SdloraError(f"{where}: module {name} has shape {list(m.shape)} but the model's is "
                                  f"{list(hit.shape)}; the adapter was trained for a different model (size) than "
                                  f"'{base.name}': use it with the model it was trained on")
            key = (hit.component, hit.module_path or hit.path)  # a fused module: its original path
            self.entries[key] = hit
            targets[key] = m
        if not targets:
            raise SdloraError(f"{where}: none of its {len(f.modules)} modules matches a module of '{base.name}' "
                              f"({archs.label(base.arch)}); it is not a LoRA for this model")
        self._check_embeddings(f, where)
        name, n = f.name, 2
        while name in self.adapters:
            name, n = f"{f.name}-{n}", n + 1
        f.name = name
        for key, m in targets.items():
            if key not in self.backup:
                self.backup[key] = self._weight(key).detach().to("cpu", torch.float32, copy=True)
            if m.bias_delta() is not None and key not in self.bias_backup:  # a full diff's diff_b
                bias = self._module(key).bias
                if bias is None:
                    raise SdloraError(f"{where}: module {m.name} carries a bias delta but the model's layer has no "
                                      "bias; the adapter is for another model")
                self.bias_backup[key] = bias.detach().to("cpu", torch.float32, copy=True)
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
                bounds.strength(v, name)  # finite and within ±MAX_STRENGTH: the rule generate and merge check too
        changed = [n for n in self.adapters if new[n] != self.strengths[n]]
        dirty = {k for n in changed for k in self.adapters[n].targets}
        with torch.no_grad():
            for key in dirty:
                dev = self._weight(key).device  # fp32 arithmetic where the weight lives (the GPU, when there is one)
                w = self.backup[key].to(dev, copy=True)
                for name, r in self.adapters.items():
                    s = new[name][1] if key[0] == DENOISER else new[name][0]
                    if s != 0.0 and key in r.targets:
                        w += s * r.targets[key].delta(dev, base=self.backup[key].to(dev))
                layouts.set_weight(self.base.components[key[0]], self.entries[key], w)
                if key in self.bias_backup:
                    bias = self._module(key).bias
                    b = self.bias_backup[key].to(dev, copy=True)
                    for name, r in self.adapters.items():
                        s = new[name][1] if key[0] == DENOISER else new[name][0]
                        d = r.targets[key].bias_delta() if key in r.targets else None
                        if s != 0.0 and d is not None:
                            b += s * d.to(dev).float()
                    bias.copy_(b.to(bias.dtype))
        self.strengths = new

    def _check_embeddings(self, f: AdapterFile, where: str) -> None:
        """Refuse bundled embeddings (pivotal tuning) for text encoders the model lacks or of another width."""
        tes = {t.component: t for t in self.base.spec.text_encoders if t.kind == "clip"}
        for name, vecs in f.embeddings.items():
            for c, v in vecs.items():
                width = (self.base.modules[tes[c].attr].get_input_embeddings().weight.shape[1]
                         if c in tes else None)
                if width != v.shape[1]:
                    raise SdloraError(f"{where}: its embedding '{name}' has {c} vectors of width {v.shape[1]}, but "
                                      f"'{self.base.name}' " + (f"reads {width}" if width else "has no such encoder")
                                      + "; use it with the model it was trained on")

    @contextmanager
    def tokens(self):
        """Inside: the embeddings bundled with the active adapters (pivotal tuning) are words of the model's CLIP
        encoders (`lora.tokens`; a prompt's trigger expands to the learnt tokens), whole whatever an adapter's
        strength: the strength scales its LoRA part only. After: the model and tokenizers as before. Yields the
        `lora.tokens.Attached`, or None when no active adapter bundles one."""
        vecs, owner = {}, {}
        for r, _, _ in self.active():
            for name, v in r.file.embeddings.items():
                if name in vecs:
                    raise SdloraError(f"{r.file.name} and {owner[name]} both bundle an embedding '{name}'; use one "
                                      "of them at a time")
                vecs[name], owner[name] = v, r.file.name
        if not vecs:
            yield None
            return
        attached = T.Attached(self.base, [t for t in self.base.spec.text_encoders if t.kind == "clip"], vecs)
        try:
            yield attached
        finally:
            attached.detach()

    def active(self) -> list[tuple[Resolved, float, float]]:
        """Adapters fused with a non-zero strength: (adapter, text-encoder strength, unet strength)."""
        return [(self.adapters[n], te, u) for n, (te, u) in self.strengths.items() if te != 0.0 or u != 0.0]
