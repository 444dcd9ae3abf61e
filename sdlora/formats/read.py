"""The one reader: any LoRA file or folder -> the neutral `AdapterFile` (formats/adapter.py).

Layouts read: kohya (`lora_unet_…`/`lora_te…_` + `.lora_down.weight` / `.lora_up.weight` / `.alpha`, what kohya,
OneTrainer and ai-toolkit write for SD 1.x/2.x/SDXL), diffusers (`save_lora_weights`: `unet.<path>.lora_A.weight`,
older `.lora.down.weight` / `to_q_lora` spellings, PEFT configs in the `lora_adapter_metadata` header), PEFT files
(`base_model.model.<path>.lora_A.weight`, `adapter_config.json` beside them: `lora_alpha`, `alpha_pattern`) and
PEFT folders (one `adapter_model.safetensors` + `adapter_config.json`, or one such folder per component as
`sdlora convert --to peft` writes). Parsing (`parse`) is pure: tensors and metadata in, dataclasses out; file I/O
is `formats/file_io.py`'s. Every module is sanity-checked (`adapter.check_module`); keys that are not parts of a module
sdlora can apply are kept in `AdapterFile.unknown`, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora import archs
from sdlora.errors import SdloraError
from sdlora.formats import embeddings as emb
from sdlora.formats import file_io, kohya
from sdlora.formats.adapter import AdapterFile, AdapterModule, check_module
from sdlora.lora import kinds

ADAPTER_META = "lora_adapter_metadata"  # diffusers' header entry with the PEFT configs per component
MISSING_ALPHA = "sdlora.kohya_modules_without_alpha"  # kohya modules that had no alpha (restored on the way back)
PEFT_PREFIX = "base_model.model."
PEFT_MAGNITUDE = ".lora_magnitude_vector"
LYCORIS_WRAPPER = "lycoris_"  # LyCORIS `create_lycoris` module-name prefix
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
# every family's diffusers components, longest first: key prefixes are matched in this order
DIFFUSERS_COMPONENTS = tuple(sorted({a for s in archs.SPECS.values() for a in s.components.values()}, key=len,
                                    reverse=True))
# other kinds sdlora does not apply: key part -> what it is (so the report can say so)
OTHER_KINDS = {"oft_": "OFT", "boft_": "BOFT", "lora_A.": "", "lora_B.": ""}


def detect_format(keys) -> str:
    """"kohya", "diffusers", "peft" or "unknown", from tensor names."""
    keys = list(keys)
    if keys and all(kohya.component_of(k) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith(tuple(c + "." for c in DIFFUSERS_COMPONENTS)) for k in keys):
        return "diffusers"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    return "unknown"


# ----------------------------------------------------------------------------------------------------------
# the family a file is for


def arch_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    spec_arch = metadata.get("modelspec.architecture", "")
    for s in archs.SPECS.values():
        if version and version.startswith(s.kohya_version_prefix):
            return s.id
    if metadata.get("ss_v2") == "True":
        return next(s.id for s in archs.SPECS.values() if s.is_v2)
    for s in archs.SPECS.values():
        if spec_arch.startswith(s.modelspec_prefix):
            return s.id
    return None


def detect_arch(names, metadata: dict[str, str], shapes: dict[str, tuple] | None = None) -> str | None:
    """The family of an adapter: from `ss_base_model_version`/`ss_v2`/modelspec; else from which components and
    UNet naming its kohya module `names` use; else from `shapes` (module -> down shape). None when nothing decides."""
    arch = arch_from_metadata(metadata)
    if arch:
        return arch
    from sdlora.formats import dit

    names = list(names)
    for arch_id, roots in dit.BLOCK_ROOTS.items():  # SD 3.x / FLUX.1 original block names
        if any(n.startswith(tuple(kohya.PREFIX["unet"] + "_" + r for r in roots)) for n in names):
            return arch_id
    used = {kohya.component_of(n) for n in names} - {None}
    ldm = any(kohya.is_ldm_unet_name(n) for n in names)
    cands = [s for s in archs.SPECS.values() if s.denoiser_names != "original"
             and used <= set(s.components) and (not ldm or s.denoiser_names == "ldm")]
    return _by_shapes(cands, names, shapes or {})


def _by_shapes(cands: list, names, shapes: dict[str, tuple]) -> str | None:
    """Narrow candidate families by the cross-attention key/value input width (= the text width) and by the deepest
    text-encoder layer a module names."""
    if len(cands) > 1:
        widths = {shape[1] for n, shape in shapes.items() if kohya.is_cross_attention_kv(n) and len(shape) == 2}
        cands = [s for s in cands if archs.load_config(s.id, s.denoiser).get("cross_attention_dim") in widths] or cands
    if len(cands) > 1:
        deepest = max((kohya.te_layer(n) for n in names if kohya.te_layer(n) is not None), default=-1)
        cands = [s for s in cands
                 if all(deepest < archs.load_config(s.id, t.attr)["num_hidden_layers"] for t in s.text_encoders)]
    return cands[0].id if len(cands) == 1 else None


# ----------------------------------------------------------------------------------------------------------
# parsing


def _alpha(t: torch.Tensor, key: str, where: str) -> float:
    if t.numel() != 1:
        raise SdloraError(f"{where}: {key} holds {t.numel()} values, an alpha is one number; the file is damaged or "
                          "not a LoRA, re-export it")
    return float(t.float().reshape(()).item())


def _other_kind(key: str) -> str | None:
    return next((kind for part, kind in OTHER_KINDS.items() if part in key and kind), None)


def _kohya_modules(tensors, where: str) -> tuple[dict[str, AdapterModule], list[str], list[str]]:
    """kohya tensors -> (modules, unknown keys, notes)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        split = kohya.module_of_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = t
    modules = {}
    for name, parts in groups.items():
        kind = kohya.kind_of(parts)
        if kind is None:
            unknown += [f"{name}.{s}" for s in parts]
            continue
        alpha = parts.get(kohya.ALPHA)
        roles = kohya.roles_of(kind, parts)
        modules[name] = AdapterModule(name, kinds.pair_kind(roles) if kinds.get(kind).pair else kind, roles,
                                      None if alpha is None else _alpha(alpha, f"{name}.{kohya.ALPHA}", where))
    return modules, unknown, []


def _alpha_from(config: dict, path: str):
    """PEFT's alpha of module `path`: `alpha_pattern` entries match the path's end, else `lora_alpha`."""
    for key, v in (config.get("alpha_pattern") or {}).items():
        if path == key or path.endswith("." + key):
            return v
    return config.get("lora_alpha")


def _peft_component(comp: str, sub: dict[str, torch.Tensor], config: dict | None, where: str):
    """PEFT/diffusers-keyed tensors of one component -> ({path: (down, up, alpha or None)}, unknown keys)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    alphas = {k[:-len(".alpha")]: _alpha(v, k, where) for k, v in sub.items() if k.endswith(".alpha")}
    # PEFT DoRA: `<path>.lora_magnitude_vector(.weight)`, one norm per output channel ([out] Linear, [1, out, 1, 1]
    # conv; docs/lycoris-and-dit.md §4.3), kept as the [out, 1(, 1, 1)] magnitude LyCORIS writes for that axis
    mags = {k.split(PEFT_MAGNITUDE)[0]: v for k, v in sub.items() if PEFT_MAGNITUDE in k}
    sub = {k: v for k, v in sub.items() if not k.endswith(".alpha") and PEFT_MAGNITUDE not in k}
    if not any(".lora_A." in k or ".lora_B." in k for k in sub):  # older diffusers spellings
        try:
            sub = convert_unet_state_dict_to_peft(sub) if comp == "unet" else \
                convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
        except ValueError:  # diffusers cannot tell the spelling: the keys stay as they are and are reported unknown
            pass
    out, unknown = {}, []
    for k, down in sub.items():
        if ".lora_A." not in k:
            if ".lora_B." not in k or k.replace(".lora_B.", ".lora_A.") not in sub:
                unknown.append(f"{comp}.{k}")
            continue
        base = k.split(".lora_A.")[0]
        up = sub.get(k.replace(".lora_A.", ".lora_B."))
        if up is None:
            unknown.append(f"{comp}.{k}")
            continue
        path = kohya.te_path(base) if comp != "unet" else base
        alpha = alphas.get(base)
        if alpha is None and config:
            alpha = _alpha_from(config, path)
        mag = mags.pop(base, None)
        if mag is not None:
            mag = mag.reshape(up.shape[0], *[1] * (up.dim() - 1))
        out[path] = (down, up, None if alpha is None else float(alpha), mag)
    unknown += [f"{comp}.{k}{PEFT_MAGNITUDE}" for k in mags]
    return out, unknown


def _split_components(tensors) -> dict[str, dict[str, torch.Tensor]]:
    """{diffusers component: its keys without the component prefix}. A bare PEFT file of one component (keys with no
    component prefix) belongs to the UNet when any of its module paths is a UNet path, else to the text encoder."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bare: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        k2 = k.removeprefix(PEFT_PREFIX)
        comp = next((c for c in DIFFUSERS_COMPONENTS if k2.startswith(c + ".")), None)
        if comp is None:
            bare[k2] = v
        else:
            parts.setdefault(comp, {})[k2[len(comp) + 1:]] = v
    if bare:
        unet = any(k.startswith(_UNET_ROOTS) for k in bare)
        parts.setdefault("unet" if unet else "text_encoder", {}).update(bare)
    return parts


def _peft_modules(parts: dict[str, dict], configs: dict[str, dict], metadata: dict[str, str], where: str):
    """{diffusers component: PEFT-keyed tensors} -> (modules, unknown keys, notes, arch)."""
    found, unknown = {}, []
    for comp, sub in parts.items():
        mods, unk = _peft_component(comp, sub, configs.get(comp), where)
        unknown += unk
        found.update({(comp, p): v for p, v in mods.items()})
    arch = arch_from_metadata(metadata)
    if arch is None:  # the families with these components (and SDXL's added embedding), then widths and depths
        added = any(p.startswith("add_embedding") for _, p in found)
        cands = [s for s in archs.SPECS.values()
                 if set(parts) <= set(s.components.values()) and (s.micro_conditioning or not added)]
        if any(s.denoiser_names == "original" for s in cands):  # a transformer: FLUX.1 has single-stream blocks
            single = any(p.startswith("single_transformer_blocks.") for _, p in found)
            cands = [s for s in cands if s.packed_latents == single] or cands
        shapes = {kohya.kohya_name("unet" if c == "unet" else "te", p): tuple(v[0].shape)
                  for (c, p), v in found.items()}
        arch = _by_shapes(cands, list(shapes), shapes)
    spec = archs.get(arch or "sd1")
    kcomp = {attr: c for c, attr in spec.components.items()}
    missing = set(json.loads(metadata.get(MISSING_ALPHA, "[]")))
    if spec.denoiser_names == "original":  # SD 3.x / FLUX.1: q/k/v LoRAs fused onto the original modules
        found, fused_unknown = _fuse_original(spec, found)
        unknown += fused_unknown
    modules, defaulted = {}, 0
    for (comp, path), (down, up, alpha, mag) in found.items():
        if comp not in kcomp:
            unknown.append(f"{comp}.{path}")
            continue
        name = kohya.kohya_name(kcomp[comp], path, spec.id)
        if name in missing:  # a kohya module without alpha, converted by sdlora: restored as it was
            alpha = None
        elif alpha is None:
            alpha = float(down.shape[0])  # the scale diffusers and PEFT load a module without alpha with
            defaulted += 1
        roles = {"down": down, "up": up} | ({"magnitude": mag} if mag is not None else {})
        modules[name] = AdapterModule(name, kinds.pair_kind(roles), roles, alpha)
    notes = [f"{defaulted} module(s) carry no alpha: read as alpha = rank, the scale diffusers and PEFT load them "
             "with"] if defaulted else []
    return modules, unknown, notes, arch


def _fuse_original(spec, found: dict) -> tuple[dict, list[str]]:
    """diffusers-named LoRAs of an SD 3.x / FLUX.1 transformer (ai-toolkit, diffusers, SimpleTuner files) -> LoRAs
    on the original model's modules kohya names (`kohya.fuse`: exact, the same ΔW). The row ranges of fused parts
    come from the real architecture, scaled to the file's widths (a smaller model keeps the ratios)."""
    from sdlora.archs.spec import DENOISER
    from sdlora.formats import layouts

    den = {p: v for (c, p), v in found.items() if c == spec.denoiser}
    if not den:
        return found, []
    originals = {m.path: m.parts or ((m.module_path, 0, m.shape[0]),)
                 for m in layouts.kohya_table(spec.id).values() if m.component == DENOISER}
    owner = {p: o for o, parts in originals.items() for p, _, _ in parts}
    unknown = [f"{spec.denoiser}.{p}" for p in den if p not in owner]
    mods = {p: v for p, v in den.items() if p in owner}
    scaled = {}
    for o in {owner[p] for p in mods}:
        parts = originals[o]
        full = {p: max(b for q, _, b in parts if q == p) for p, _, _ in parts}
        f = next(mods[p][1].shape[0] / full[p] for p, _, _ in parts if p in mods)
        scaled[o] = tuple((p, round(a * f), round(b * f)) for p, a, b in parts)
    trained = {p: (kinds.LORA.name, {"down": d, "up": u}, a if a is not None else float(d.shape[0]))
               for p, (d, u, a, mag) in mods.items()}
    out = {(c, p): v for (c, p), v in found.items() if c != spec.denoiser}
    for o, (_, t, alpha) in kohya.fuse(trained, scaled).items():
        out[(spec.denoiser, o)] = (t["down"], t["up"], alpha, None)
    return out, unknown


def _lycoris_wrapper_names(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """LyCORIS's `create_lycoris` wrapper (used by SimpleTuner and ai-toolkit) names modules `lycoris_` + the
    diffusers path with `.` -> `_`; for the UNet that is kohya's `lora_unet_` name (SDXL's diffusers-style names are
    aliases, `layouts.aliases`). Other `lycoris_` keys are left as they are (reported unknown)."""
    roots = tuple(LYCORIS_WRAPPER + r.replace(".", "_") for r in _UNET_ROOTS)
    if not any(k.startswith(roots) for k in tensors):
        return tensors, 0
    out, n = {}, 0
    for k, v in tensors.items():
        if k.startswith(roots):
            k, n = kohya.PREFIX["unet"] + "_" + k[len(LYCORIS_WRAPPER):], n + 1
        out[k] = v
    return out, n


def parse(tensors: dict[str, torch.Tensor], metadata: dict[str, str], configs: dict[str, dict] | None = None,
          where: str = "<tensors>") -> AdapterFile:
    """An AdapterFile from a LoRA state dict in any supported layout (pure: no I/O). `configs` are PEFT configs per
    diffusers component (from `adapter_config.json` files). Raises SdloraError for a file with no module sdlora
    can apply, or a damaged module."""
    tensors, embeddings = emb.split_bundle(tensors, where)  # A1111's bundle_emb.* (pivotal tuning's tokens)
    tensors, renamed = _lycoris_wrapper_names(tensors)
    fmt = detect_format(tensors)
    metadata = dict(metadata)
    if fmt == "kohya":
        modules, unknown, notes = _kohya_modules(tensors, where)
        for m in modules.values():  # before anything reads their shapes
            check_module(m, where)
        shapes = {n: tuple(m.shape) for n, m in modules.items()}
        arch = detect_arch(list(modules), metadata, shapes)
    elif fmt in ("diffusers", "peft"):
        configs = dict(configs or {})
        if metadata.get(ADAPTER_META):
            for k, v in json.loads(metadata[ADAPTER_META]).items():
                comp, _, key = k.partition(".")
                configs.setdefault(comp, {})[key] = v
        parts = _split_components(tensors)
        if set(configs) == {"*"}:  # one config beside a one-component file
            configs = {c: configs["*"] for c in parts}
        modules, unknown, notes, arch = _peft_modules(parts, configs, metadata, where)
        metadata = {k: v for k, v in metadata.items() if k not in (ADAPTER_META, "format")}
    else:
        modules, unknown, notes, arch = {}, list(tensors), [], None
    kinds = sorted({k for k in map(_other_kind, unknown) if k})
    if not modules:
        what = f" ({', '.join(kinds)} modules are not supported yet)" if kinds else ""
        raise SdloraError(f"{where}: no LoRA modules sdlora can apply (kohya/LyCORIS lora_down/lora_up, hada_*, "
                          f"lokr_*, diff; diffusers or PEFT lora_A/lora_B){what}; "
                          "pass a LoRA .safetensors or a PEFT folder")
    for m in modules.values():
        check_module(m, where)
    if renamed:
        notes.append(f"{renamed} key(s) use LyCORIS's wrapper names (`lycoris_<diffusers UNet path>`, "
                     "SimpleTuner and ai-toolkit LyCORIS files), read as kohya's `lora_unet_` names; "
                     "`sdlora convert IN OUT --to kohya` writes the names every loader matches")
    if kinds:
        notes.append(f"{', '.join(kinds)} modules are not supported yet: their keys are listed as unknown")
    return AdapterFile(modules=modules, metadata=metadata, source=fmt, arch=arch, unknown=sorted(unknown), notes=notes,
                       embeddings=embeddings)


# ----------------------------------------------------------------------------------------------------------
# files and folders


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SdloraError(f"{path}: not a readable PEFT adapter_config.json ({e}); re-export the adapter") from e


def read_adapter(path) -> AdapterFile:
    """Read a LoRA `.safetensors` file (kohya, diffusers, PEFT) or a PEFT folder. Missing, pickle, truncated or
    damaged files, and files with no LoRA module, give a one-line SdloraError."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in file_io.PICKLE_SUFFIXES:
        raise SdloraError(f"{path}: an adapter must be a .safetensors file or a PEFT folder")
    tensors, metadata = file_io.load(path)
    side = path.with_name("adapter_config.json")
    configs = {"*": _config(side)} if side.is_file() else None
    a = parse(tensors, metadata, configs, where=str(path))
    a.path = path
    a.name = a.file_name
    return a


def _read_folder(path: Path) -> AdapterFile:
    if (path / "adapter_model.safetensors").is_file():  # one PEFT adapter
        a = read_adapter(path / "adapter_model.safetensors")
    else:  # one PEFT adapter per component: unet/, text_encoder/, text_encoder_2/
        tensors, configs, metadata = {}, {}, {}
        for comp in DIFFUSERS_COMPONENTS:
            f = path / comp / "adapter_model.safetensors"
            if f.is_file():
                t, md = file_io.load(f)
                tensors |= {f"{comp}.{k.removeprefix(PEFT_PREFIX)}": v for k, v in t.items()}
                cfg = path / comp / "adapter_config.json"
                configs[comp] = _config(cfg) if cfg.is_file() else {}
                metadata = metadata or md
        if not tensors:
            raise SdloraError(f"{path}: no adapter_model.safetensors in the folder or in unet/, text_encoder/, "
                              "text_encoder_2/; pass a PEFT folder or a LoRA .safetensors")
        a = parse(tensors, metadata, configs, where=str(path))
        a.source = "peft"
    a.path = path
    a.name = a.file_name
    return a
