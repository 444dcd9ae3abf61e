"""`sdlora convert`: kohya <-> diffusers <-> PEFT LoRA files, alpha carried through (never assumed = rank).

- kohya: one .safetensors, `lora_unet_*` / `lora_te*_*` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`.
- diffusers: one .safetensors as `save_lora_weights` writes it: `unet.<path>.lora_A.weight`, `.lora_B.weight`,
  `text_encoder.text_model.<path>...`, `text_encoder_2....`, and the PEFT configs (r, lora_alpha, rank_pattern,
  alpha_pattern) in the `lora_adapter_metadata` header entry, which `load_lora_weights` reads. Older diffusers
  spellings (`.lora.down.weight`, `to_q_lora`, `lora_linear_layer`) are read too.
- peft: a folder with one PEFT adapter per component (`unet/`, `text_encoder/`, `text_encoder_2/`: each
  `adapter_model.safetensors` + `adapter_config.json`), what `PeftModel.from_pretrained(component, folder/unet)`
  loads.
The kohya metadata (`ss_*`, `modelspec.*`, `sshs_*`) travels in the header of every format, so kohya -> other ->
kohya gives the same tensors and metadata.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats import io, kohya, layouts

DIFFUSERS_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
ADAPTER_META = "lora_adapter_metadata"
MISSING_ALPHA = "sdlora.kohya_modules_without_alpha"  # kohya modules that had no alpha (restored on the way back)
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


def detect_format(keys) -> str:
    keys = list(keys)
    if keys and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    return "unknown"


def _arch(names, metadata, shapes, arch):
    from sdlora.formats.verify import guess_arch

    return arch or guess_arch(names, metadata, shapes) or "sd1"


# ----------------------------------------------------------------------------------------------------------
# kohya -> neutral (component, path) -> (down, up, alpha) and back


def kohya_modules(tensors, metadata, arch=None):
    """kohya tensors -> ({(component, path): (down, up, alpha or None)}, report)."""
    groups = kohya.group(tensors)
    stray = sorted(groups.pop("", {}))
    shapes = {m: tuple(p["lora_down.weight"].shape) for m, p in groups.items() if "lora_down.weight" in p}
    arch = _arch(list(groups), metadata, shapes, arch)
    rep = ConvertReport("kohya", arch, skipped=stray)
    table = layouts.kohya_table(arch)
    alias = layouts.aliases(table, arch)
    out = {}
    for m, p in groups.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            rep.skipped += [f"{m}.{s}" for s in p]
            continue
        c = m if m in table else alias.get(m)
        if c is None:
            rep.unknown.append(m)
            continue
        mod = table[c]
        alpha = p.get("alpha")
        out[(mod.component, mod.path)] = (p["lora_down.weight"], p["lora_up.weight"], alpha)
    rep.converted = len(out)
    return out, rep


def modules_to_kohya(modules, arch: str, missing_alpha=()) -> dict[str, torch.Tensor]:
    """Neutral modules -> kohya tensors. A None alpha is written as rank (the scale every loader used) unless the
    module is listed in `missing_alpha` (it had none in the kohya original)."""
    out = {}
    for (comp, path), (down, up, alpha) in modules.items():
        name = kohya.kohya_name(comp, path, arch)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        if name in missing_alpha:
            continue
        if alpha is None:
            alpha = float(down.shape[0])
        out[f"{name}.alpha"] = alpha if torch.is_tensor(alpha) else torch.tensor(float(alpha), dtype=down.dtype)
    return out


def _peft_config(mods: dict[str, tuple]) -> dict:
    """A PEFT LoraConfig dict for modules {path: (down, up, alpha)}: the commonest rank/alpha plus patterns."""
    ranks = {p: int(d.shape[0]) for p, (d, _, _) in mods.items()}
    alphas = {p: float(a) if a is not None else float(ranks[p]) for p, (_, _, a) in mods.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": a, "target_modules": sorted(mods), "lora_dropout": 0.0, "bias": "none",
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != a}}


def _by_component(modules) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for (comp, path), v in modules.items():
        out.setdefault(DIFFUSERS_COMPONENT[comp], {})[path] = v
    return out


def _carry(metadata: dict[str, str], src_missing) -> dict[str, str]:
    md = {k: v for k, v in metadata.items() if k not in (ADAPTER_META, "format")}
    if src_missing:
        md[MISSING_ALPHA] = json.dumps(sorted(src_missing))
    return md


def _missing_names(modules, arch):
    return [kohya.kohya_name(c, p, arch) for (c, p), (_, _, a) in modules.items() if a is None]


def to_diffusers(modules, metadata, arch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Neutral modules -> diffusers `save_lora_weights` tensors and header."""
    tensors, adapter_meta = {}, {}
    for comp, mods in _by_component(modules).items():
        for path, (down, up, _) in mods.items():
            key = f"{comp}.{'text_model.' if comp != 'unet' else ''}{path}"
            tensors[f"{key}.lora_A.weight"] = down.contiguous()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
        for k, v in _peft_config(mods).items():
            adapter_meta[f"{comp}.{k}"] = v
    md = _carry(metadata, _missing_names(modules, arch))
    md["format"] = "pt"
    md[ADAPTER_META] = json.dumps(adapter_meta, sort_keys=True)
    return tensors, md


def _alpha_from(config: dict, path: str):
    pattern = config.get("alpha_pattern") or {}
    for key, v in pattern.items():
        if path == key or path.endswith("." + key):
            return v
    return config.get("lora_alpha")


def _peft_modules(comp: str, sub: dict[str, torch.Tensor], config: dict | None, rep: ConvertReport):
    """PEFT-keyed tensors of one diffusers component -> {path: (down, up, alpha)}."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    alphas = {k[:-len(".alpha")]: float(v.float().item()) for k, v in sub.items() if k.endswith(".alpha")}
    sub = {k: v for k, v in sub.items() if not k.endswith(".alpha")}
    if not any(".lora_A." in k or ".lora_B." in k for k in sub):
        sub = convert_unet_state_dict_to_peft(sub) if comp == "unet" else \
            convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
    out = {}
    for k, down in sub.items():
        if ".lora_A." not in k:
            if ".lora_B." not in k:
                rep.skipped.append(f"{comp}.{k}")
            continue
        base = k.split(".lora_A.")[0]
        up = sub.get(k.replace(".lora_A.", ".lora_B."))
        if up is None:
            rep.skipped.append(f"{comp}.{k}")
            continue
        path = kohya.te_path(base) if comp != "unet" else base
        alpha = alphas.get(base)
        if alpha is None and config:
            alpha = _alpha_from(config, path)
        out[path] = (down, up, alpha)
    return out


def modules_from_peft(parts: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict], metadata, arch, source):
    """{diffusers component: PEFT-keyed tensors} -> (neutral modules, report); alpha from the configs, else rank."""
    shapes, names, found = {}, [], {}
    rep = ConvertReport(source, "?")
    for comp, sub in parts.items():
        for path, v in _peft_modules(comp, sub, configs.get(comp), rep).items():
            found[(comp, path)] = v
            kcomp = "unet" if comp == "unet" else ("te2" if comp == "text_encoder_2" else "te")
            names.append(kohya.kohya_name(kcomp, path))
            shapes[names[-1]] = tuple(v[0].shape)
    if "text_encoder_2" in parts or any(c == "unet" and p.startswith("add_embedding") for c, p in found):
        arch = arch or "sdxl"
    arch = _arch(names, metadata, shapes, arch)
    rep.arch = arch
    table = layouts.kohya_table(arch)
    missing = set(json.loads(metadata.get(MISSING_ALPHA, "[]")))
    out, defaulted = {}, 0
    for (comp, path), (down, up, alpha) in found.items():
        kcomp = {"unet": "unet", "text_encoder_2": "te2"}.get(comp, "te1" if arch == "sdxl" else "te")
        name = kohya.kohya_name(kcomp, path, arch)
        if name not in table:
            rep.unknown.append(f"{comp}.{path}")
            continue
        if alpha is None and name not in missing:
            defaulted += 1
        out[(kcomp, path)] = (down, up, alpha)
    if defaulted:
        rep.notes.append(f"{defaulted} module(s) carry no alpha: written as alpha = rank, the scale diffusers and "
                         "PEFT load them with")
    rep.converted = len(out)
    return out, rep


# ----------------------------------------------------------------------------------------------------------
# Files


def read(path) -> tuple[dict, ConvertReport, dict[str, str], str]:
    """Any supported LoRA file or PEFT folder -> (neutral modules, report, kohya metadata, architecture)."""
    path = Path(path)
    if path.is_dir():
        parts, configs, metadata = {}, {}, {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            f = path / comp / "adapter_model.safetensors"
            if f.is_file():
                t, md = io.load(f)
                parts[comp] = {k.removeprefix("base_model.model."): v for k, v in t.items()}
                cfg = path / comp / "adapter_config.json"
                configs[comp] = json.loads(cfg.read_text()) if cfg.is_file() else {}
                metadata = metadata or md
        if not parts:
            raise SdloraError(f"{path}: no unet/, text_encoder/ or text_encoder_2/ adapter_model.safetensors in the "
                              "folder; pass a PEFT folder written by `sdlora convert --to peft` or a .safetensors")
        mods, rep = modules_from_peft(parts, configs, metadata, None, "peft")
        return mods, rep, _clean(metadata), rep.arch
    tensors, metadata = io.load(path)
    fmt = detect_format(tensors)
    if fmt == "kohya":
        mods, rep = kohya_modules(tensors, metadata)
        return mods, rep, metadata, rep.arch
    if fmt in ("diffusers", "peft"):
        configs = {}
        if metadata.get(ADAPTER_META):
            raw = json.loads(metadata[ADAPTER_META])
            for k, v in raw.items():
                comp, _, key = k.partition(".")
                configs.setdefault(comp, {})[key] = v
        parts, stray = {}, []
        for k, v in tensors.items():
            k2 = k.removeprefix("base_model.model.")
            comp = next((c for c in ("text_encoder_2", "text_encoder", "unet") if k2.startswith(c + ".")), None)
            if comp is None:  # a bare PEFT file of one component: decide by its module names
                comp = "unet" if "blocks" in k2 or "conv_in" in k2 else "text_encoder"
                parts.setdefault(comp, {})[k2] = v
            else:
                parts.setdefault(comp, {})[k2[len(comp) + 1:]] = v
        if fmt == "peft" and not configs:
            cfg = path.parent / "adapter_config.json"
            if cfg.is_file():
                configs = {c: json.loads(cfg.read_text()) for c in parts}
        mods, rep = modules_from_peft(parts, configs, metadata, None, fmt)
        rep.skipped += stray
        return mods, rep, _clean(metadata), rep.arch
    raise SdloraError(f"{path}: no LoRA keys sdlora knows (kohya lora_down/lora_up, diffusers or PEFT lora_A/lora_B); "
                      "LoHa/LoKr/OFT files are not supported")


def _clean(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in (ADAPTER_META, "format")}


def to_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], arch: str | None = None):
    """Tensors of a kohya, diffusers or PEFT LoRA -> (kohya tensors, kohya metadata, report). For sdlora's own
    loading of non-kohya files (infer.py)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "in.safetensors"
        io.atomic_save(tensors, p, metadata)
        mods, rep, md, a = read(p)
    missing = set(json.loads(md.pop(MISSING_ALPHA, "[]")))
    return modules_to_kohya(mods, arch or a, missing), md, rep


def write(modules, metadata: dict[str, str], arch: str, out, to: str, alpha_if_missing: float | None = None) -> Path:
    """Write neutral modules as `to` ("kohya", "diffusers", "peft") at `out`."""
    out = Path(out)
    metadata = dict(metadata)
    missing = set(json.loads(metadata.pop(MISSING_ALPHA, "[]")))
    if alpha_if_missing is not None:
        modules = {k: (d, u, alpha_if_missing if a is None else a) for k, (d, u, a) in modules.items()}
        missing = set()
    if to == "kohya":
        from sdlora.adapter import save

        tensors = modules_to_kohya(modules, arch, missing)
        metadata.pop("sshs_model_hash", None)
        metadata.pop("sshs_legacy_hash", None)
        save(tensors, out, metadata)  # recomputes kohya's sshs_* hashes
        return out
    if to == "diffusers":
        tensors, md = to_diffusers(modules, metadata, arch)
        io.atomic_save(tensors, out, md)
        return out
    if to == "peft":
        def fill(tmp: Path) -> None:
            for comp, mods in _by_component(modules).items():
                d = tmp / comp
                d.mkdir()
                tensors = {}
                for path, (down, up, _) in mods.items():
                    tensors[f"base_model.model.{path}.lora_A.weight"] = down.contiguous()
                    tensors[f"base_model.model.{path}.lora_B.weight"] = up.contiguous()
                cfg = _peft_config(mods) | {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
                                            "init_lora_weights": True, "inference_mode": True}
                (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
                md = _carry(metadata, _missing_names(modules, arch)) | {"format": "pt"}
                io.atomic_save(tensors, d / "adapter_model.safetensors", md)
        io.atomic_write_dir(out, fill)
        return out
    raise SdloraError(f"unknown format '{to}'; use one of: {', '.join(FORMATS)}")


def convert(src, out, to: str, arch: str | None = None, alpha_if_missing: float | None = None) -> ConvertReport:
    """Convert the LoRA at `src` to format `to` at `out`; returns the counts."""
    if to not in FORMATS:
        raise SdloraError(f"--to {to}: use one of {', '.join(FORMATS)}")
    mods, rep, md, a = read(src)
    if not mods:
        raise SdloraError(f"{src}: none of its modules could be converted ({rep.line()}); is it a LoRA for SD 1.x, "
                          "SD 2.x or SDXL?")
    write(mods, md, arch or a, out, to, alpha_if_missing)
    return rep


def add_convert_args(p) -> None:
    p.add_argument("input", help="LoRA file (.safetensors: kohya, diffusers or PEFT) or a PEFT folder")
    p.add_argument("output", help="output .safetensors (kohya, diffusers) or folder (peft)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--arch", choices=kohya.ARCHS, default=None, help="architecture (default: from metadata and names)")
    p.add_argument("--alpha-if-missing", type=float, default=None, metavar="ALPHA",
                   help="write this alpha for modules that have none (default: keep them as they are)")


def cmd_convert(args) -> int:
    rep = convert(args.input, args.output, args.to, args.arch, args.alpha_if_missing)
    print(rep.line())
    for n in rep.notes:
        print(f"note: {n}")
    print(args.output)
    return 0
