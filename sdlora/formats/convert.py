"""What `sdlora convert` does: kohya <-> diffusers <-> PEFT LoRA files, alpha carried through (never assumed = rank).

- kohya: one .safetensors, `lora_unet_*` / `lora_te*_*` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- diffusers: one .safetensors as `save_lora_weights` writes it: `unet.<path>.lora_A.weight`, `.lora_B.weight`,
  `text_encoder.text_model.<path>...`, `text_encoder_2....`, and the PEFT configs (r, lora_alpha, rank_pattern,
  alpha_pattern) in the `lora_adapter_metadata` header entry, which `load_lora_weights` reads. Older diffusers
  spellings (`.lora.down.weight`, `to_q_lora`, `lora_linear_layer`) are read too.
- peft: a folder with one PEFT adapter per component (`unet/`, `text_encoder/`, `text_encoder_2/`: each
  `adapter_model.safetensors` + `adapter_config.json`), what `PeftModel.from_pretrained(component, folder/unet)`
  loads.
The kohya metadata (`ss_*`, `modelspec.*`, `sshs_*`) travels in the header of every format, so kohya -> other ->
kohya gives the same tensors and metadata. The command line is in `sdlora/cli_formats.py`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import archs
from sdlora.errors import SdloraError
from sdlora.formats import embeddings as emb
from sdlora.formats import file_io, kohya, layouts
from sdlora.formats.adapter import AdapterFile, AdapterModule
from sdlora.formats.read import ADAPTER_META, MISSING_ALPHA, PEFT_PREFIX, read_adapter
from sdlora.lora import kinds

FORMATS = ("kohya", "diffusers", "peft")


@dataclass
class ConvertReport:
    source: str
    arch: str
    converted: int = 0  # modules
    skipped: list[str] = field(default_factory=list)  # keys that are not LoRA pairs (e.g. DoRA scales, half pairs)
    unknown: list[str] = field(default_factory=list)  # modules that name no module of the architecture
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        s = (f"{self.source} -> {self.converted} modules converted, {len(self.skipped)} keys skipped, "
             f"{len(self.unknown)} unknown ({self.arch})")
        if self.skipped:
            s += f"; first skipped: {self.skipped[0]}"
        if self.unknown:
            s += f"; first unknown: {self.unknown[0]}"
        return s


def resolve(adapter: AdapterFile, arch: str) -> tuple[dict[str, tuple[layouts.Module, AdapterModule]], list[str]]:
    """Place every module on the real architecture: {canonical kohya name: (layouts.Module, module)} and the names
    that place nowhere (SDXL diffusers-style names are aliases of their canonical names). A file made for a
    built-in model (`ss_sd_model_name` tiny-flux, ...) is placed on that model: its fused modules' rows are its own."""
    from sdlora.models import BUILTIN_MODELS, load_base

    own = adapter.metadata.get("ss_sd_model_name")
    if archs.get(arch).denoiser_names == "original" and own in BUILTIN_MODELS:
        table = layouts.table_of(load_base(own).components, arch)
    else:
        table = layouts.kohya_table(arch)
    alias = layouts.aliases(table, arch)
    out, unknown = {}, []
    for name, m in adapter.modules.items():
        c = name if name in table else alias.get(name)
        if c is None:
            unknown.append(name)
        else:
            out[c] = (table[c], m)
    return out, unknown


def _peft_config(mods: dict[str, AdapterModule]) -> dict:
    """A PEFT LoraConfig dict for modules {path: module}: the commonest rank/alpha plus patterns."""
    ranks = {p: m.rank for p, m in mods.items()}
    alphas = {p: float(m.alpha) if m.alpha is not None else float(m.rank) for p, m in mods.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": a, "target_modules": sorted(mods), "lora_dropout": 0.0, "bias": "none",
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != a}}


def _by_component(placed, arch: str) -> dict[str, dict[str, AdapterModule]]:
    """{diffusers component: {module path: module}}."""
    comps = archs.get(arch).components
    out: dict[str, dict[str, AdapterModule]] = {}
    for where, m in placed.values():
        out.setdefault(comps[where.component], {})[where.path] = m
    return out


def _carry(adapter: AdapterFile) -> dict[str, str]:
    """kohya metadata for a diffusers/PEFT header, with the modules that had no alpha (restored on the way back)."""
    md = {k: v for k, v in adapter.metadata.items() if k not in (ADAPTER_META, MISSING_ALPHA, "format")}
    missing = sorted(n for n, m in adapter.modules.items() if m.alpha is None)
    if missing:
        md[MISSING_ALPHA] = json.dumps(missing)
    return md


def split_parts(where: layouts.Module, m: AdapterModule) -> dict[str, AdapterModule]:
    """An original-model module (fused q/k/v: SD 3.x, FLUX.1) as LoRAs of its diffusers modules: each part's rows
    of lora_up, with lora_down shared, keeping only the rank columns that reach those rows (a block-diagonal
    fused LoRA splits back into its blocks; a dense one stays whole: the delta is the same either way), alpha
    scaled so each part keeps the fused module's alpha/rank. Exact: ΔW_part = the fused ΔW's rows of the part."""
    up, down = m.tensors["up"], m.tensors["down"]
    rows: dict[str, list] = {}
    i = 0
    for p, a, b in where.parts:
        rows.setdefault(p, []).append((a, up[i:i + b - a]))
        i += b - a
    out = {}
    for p, pieces in rows.items():
        u = torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])])
        cols = u.abs().sum(0) != 0
        if not bool(cols.any()):
            continue  # a part that was not trained
        r = int(cols.sum())
        out[p] = AdapterModule(p, kinds.LORA.name, {"down": down[cols].contiguous(), "up": u[:, cols].contiguous()},
                               m.scale * r)
    return out


def to_diffusers(placed, adapter: AdapterFile, arch: str) -> tuple[dict, dict[str, str]]:
    """diffusers `save_lora_weights` tensors and header of placed modules. SD 3.x / FLUX.1 modules are split onto
    diffusers' separate q/k/v (`split_parts`); T5-XXL modules are left out (diffusers' SD3/FLUX loaders have no T5
    LoRA support)."""
    spec = archs.get(arch)
    by_comp: dict[str, dict[str, AdapterModule]] = {}
    for where, m in placed.values():
        if where.component == "te3":
            continue
        comp = spec.components[where.component]
        if where.parts:
            by_comp.setdefault(comp, {}).update(split_parts(where, m))
        else:  # a denoiser named by original paths: its diffusers path is the module's own
            by_comp.setdefault(comp, {})[where.module_path if comp == spec.denoiser else where.path] = m
    tensors, adapter_meta = {}, {}
    for comp, mods in by_comp.items():
        for path, m in mods.items():
            key = f"{comp}.{'text_model.' if comp != spec.denoiser else ''}{path}"
            tensors[f"{key}.lora_A.weight"] = m.tensors["down"].contiguous()
            tensors[f"{key}.lora_B.weight"] = m.tensors["up"].contiguous()
        for k, v in _peft_config(mods).items():
            adapter_meta[f"{comp}.{k}"] = v
    md = _carry(adapter) | {"format": "pt", ADAPTER_META: json.dumps(adapter_meta, sort_keys=True)}
    return tensors, md


def write(adapter: AdapterFile, arch: str, out, to: str, alpha_if_missing: float | None = None,
          overwrite: bool = False) -> ConvertReport:
    """Write `adapter` as `to` ("kohya", "diffusers", "peft") at `out`; returns the counts."""
    out = Path(out)
    if alpha_if_missing is not None:
        for m in adapter.modules.values():
            m.alpha = alpha_if_missing if m.alpha is None else m.alpha
    placed, unknown = resolve(adapter, arch)
    rep = ConvertReport(adapter.source, arch, converted=len(placed), skipped=list(adapter.unknown), unknown=unknown,
                        notes=list(adapter.notes))
    if not placed:
        raise SdloraError(f"{adapter.path}: none of its modules could be converted ({rep.line()}); is it a LoRA for "
                          + ", ".join(archs.label(a) for a in archs.IDS) + "?")
    other = sorted({m.kind + (" (Tucker)" if "mid" in m.tensors else "") for _, m in placed.values()
                    if not m.kind_spec.plain_pair or "mid" in m.tensors})
    if to != "kohya" and other:
        raise SdloraError(f"{adapter.path}: a {to} file holds LoRA pairs only (lora_A/lora_B); this one has "
                          f"{', '.join(other)} modules; convert --to kohya (the LyCORIS layout ComfyUI and A1111 read)")
    if to == "peft" and archs.get(arch).denoiser_names == "original":
        raise SdloraError(f"{adapter.path}: --to peft is not available for {archs.label(arch)}; use --to diffusers "
                          "(what diffusers' load_lora_weights reads) or --to kohya")
    if to == "kohya":
        named = AdapterFile({c: m for c, (_, m) in placed.items()}, adapter.metadata)
        md = {k: v for k, v in adapter.metadata.items() if k not in (MISSING_ALPHA,)}
        # bundled embeddings (pivotal tuning) stay in the file, as A1111 reads them
        kohya.save(kohya.to_tensors(named) | emb.to_bundle(adapter.embeddings), out, md)  # recomputes sshs_* hashes
    elif to == "diffusers":
        tensors, md = to_diffusers(placed, adapter, arch)
        file_io.atomic_save(tensors, out, md)
    elif to == "peft":
        def fill(tmp: Path) -> None:
            for comp, mods in _by_component(placed, arch).items():
                d = tmp / comp
                d.mkdir()
                tensors = {}
                for path, m in mods.items():
                    tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.tensors["down"].contiguous()
                    tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.tensors["up"].contiguous()
                cfg = _peft_config(mods) | {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
                                            "init_lora_weights": True, "inference_mode": True}
                (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
                file_io.atomic_save(tensors, d / "adapter_model.safetensors", _carry(adapter) | {"format": "pt"})
        from sdlora.guard import write_folder

        write_folder(out, fill, overwrite)
    else:
        raise SdloraError(f"unknown format '{to}'; use one of: {', '.join(FORMATS)}")
    if adapter.embeddings and to != "kohya":  # diffusers' LoRA loaders reject bundle_emb keys: files beside it
        for name, vecs in adapter.embeddings.items():
            side = emb.save_file(vecs, emb.file_path(out, name), adapter.metadata)
            rep.notes.append(f"embedding '{name}' written to {side} (load_textual_inversion reads it)")
    elif adapter.embeddings:
        rep.notes.append(f"kept {len(adapter.embeddings)} bundled embedding(s): " + "; ".join(emb.describe(
            adapter.embeddings)))
    if archs.get(arch).denoiser_names == "original" and to != "kohya":
        # the reader names files by kohya's fused modules; split q/k/v read back as parts (split_parts is exact)
        rep.notes.append("q/k/v split onto diffusers' modules" + (
            "; T5-XXL modules left out (diffusers cannot load them)" if any(
                w.component == "te3" for w, _ in placed.values()) else ""))
    else:
        check_written(out, {c: m for c, (_, m) in placed.items()})
    return rep


def check_written(out, modules: dict[str, AdapterModule]) -> None:
    """Read `out` back with the one reader and require exactly `modules` (tensors, dtypes and alphas): what training
    does after every save, for every file sdlora writes."""
    back = read_adapter(out).modules
    for name, m in modules.items():
        b = back.get(name)
        same = (b is not None and b.alpha == m.alpha and b.kind == m.kind and b.tensors.keys() == m.tensors.keys()
                and all(t.dtype == b.tensors[k].dtype and t.shape == b.tensors[k].shape
                        and bool((t == b.tensors[k]).all())
                        for k, t in m.tensors.items()))
        if not same:
            raise SdloraError(f"{out} was written but does not read back as written (module {name}); this is a bug in "
                              "sdlora, please report it with the input file")
    extra = sorted(set(back) - set(modules))
    if extra:
        raise SdloraError(f"{out} was written but reads back with {len(extra)} module(s) too many (first: {extra[0]}); "
                          "this is a bug in sdlora, please report it with the input file")


def convert(src, out, to: str, arch: str | None = None, alpha_if_missing: float | None = None,
            overwrite: bool = False) -> ConvertReport:
    """Convert the LoRA at `src` to format `to` at `out`; returns the counts."""
    from sdlora import guard

    if to not in FORMATS:
        raise SdloraError(f"--to {to}: use one of {', '.join(FORMATS)}")
    if to == "peft":
        guard.check_folder(out, "output", inputs={"input": src}, overwrite=overwrite)
    else:
        guard.check_file(out, "output", inputs={"input": src}, overwrite=overwrite)
    adapter = read_adapter(src)
    with guard.OutputLock(out, "output"):
        return write(adapter, arch or adapter.arch or next(iter(archs.SPECS)), out, to, alpha_if_missing, overwrite)
