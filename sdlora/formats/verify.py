"""`sdlora verify`: does a kohya LoRA file load, fully and with the right shapes, in kohya, diffusers, ComfyUI
and A1111, and will A1111 list it? Checks names against the real architecture (meta device, no weights) or a
loaded model; never needs a download.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats import io, kohya, layouts

ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
BUILTIN = ("tiny", "tiny-sd2", "tiny-sdxl", "toy")  # sdlora.models.BUILTIN_MODELS (not imported: models is heavy)


@dataclass
class VerifyReport:
    path: str
    arch: str
    against: str  # what the names and shapes were checked against
    modules: int = 0
    keys: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)  # tool -> one line: does it list / load the file

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"{self.path}: {ARCH_NAMES.get(self.arch, self.arch)} LoRA, {self.modules} modules, {self.keys} keys "
               f"(checked against {self.against})"]
        out += [f"  {tool:9s} {line}" for tool, line in self.tools.items()]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  PROBLEM: {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return out


def guess_arch(names, metadata: dict[str, str], shapes: dict[str, tuple] | None = None) -> str | None:
    """Architecture from `ss_base_model_version`/`ss_v2`/modelspec, else from key names and shapes."""
    from sdlora.infer import adapter_arch

    arch = adapter_arch(names, metadata)
    if arch or not shapes:
        return arch
    for name, shape in shapes.items():  # cross-attention key/value input width = text-encoder width
        if name.endswith(("attn2_to_k", "attn2_to_v")) and len(shape) == 2:
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(shape[1])
    if any(n.startswith("lora_te_text_model_encoder_layers_") and int(n.split("_")[6]) >= 12 for n in names):
        return "sd2"
    return None


def file_arch(metadata: dict[str, str]) -> str | None:
    """What A1111 files the LoRA under (network.py NetworkOnDisk): None = unknown (listed with every checkpoint)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "sdxl"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return "sd1" if metadata else None


def _shape_problem(down: torch.Tensor, up: torch.Tensor, m: layouts.Module) -> str | None:
    r = down.shape[0]
    got = (list(down.shape), list(up.shape))
    if m.conv:
        want_down, want_up = [r, m.shape[1], *m.shape[2:]], [m.shape[0], r, 1, 1]
    else:
        want_down, want_up = [r, m.shape[1]], [m.shape[0], r]
    if got != (want_down, want_up):
        return f"down {got[0]} / up {got[1]} where the model needs {want_down} / {want_up}"
    return None


def _diffusers_check(groups: dict, arch: str, table: dict[str, layouts.Module]) -> tuple[int, list[str]]:
    """Run diffusers' own kohya -> PEFT conversion (what `load_lora_weights` does) and look the results up.
    Returns (modules that land on a real module, problems)."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    from sdlora.archs import load_config

    sd = {f"{m}.{s}": t for m, p in groups.items() for s, t in p.items()}
    if not all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in sd):
        return 0, ["diffusers: keys without a lora_unet_/lora_te*_ prefix: load_lora_weights does not read it as kohya"]
    try:
        if arch == "sdxl":
            sd = _maybe_map_sgm_blocks_to_diffusers(sd, types.SimpleNamespace(**load_config(arch, "unet")))
        new, _ = _convert_non_diffusers_lora_to_diffusers(dict(sd))
        parts = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            sub = {k[len(comp) + 1:]: v for k, v in new.items() if k.startswith(comp + ".")}
            if sub:
                parts[comp] = (convert_unet_state_dict_to_peft(sub) if comp == "unet"
                               else convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub)))
    except (ValueError, KeyError) as e:
        return 0, [f"diffusers: load_lora_weights rejects the file ({str(e).strip().splitlines()[0][:160]})"]
    known = {({"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}.get(m.component, m.component),
              m.path) for m in table.values()}
    landed, missing = 0, []
    for comp, sub in parts.items():
        for k in sub:
            if ".lora_A." not in k:
                continue
            path = k.split(".lora_A.")[0]
            path = kohya.te_path(path) if comp != "unet" else path
            if (comp, path) in known:
                landed += 1
            else:
                missing.append(f"{comp}.{path}")
    problems = []
    if missing:
        problems.append(f"diffusers: {len(missing)} module(s) convert to names the model lacks "
                        f"(peft 'unexpected keys'; first: {missing[0]})")
    return landed, problems


def _a1111_check(names: list[str], arch: str) -> tuple[int, list[str]]:
    layers = layouts.a1111_layers(arch)
    hit, missing, mha = 0, [], {}
    for n in names:
        layer = kohya.a1111_name(n, arch, layers)
        if layer is None:
            missing.append(n)
            continue
        hit += 1
        if "model_transformer_resblocks_" in layer and layer.endswith(("_attn", "_attn_out_proj")):  # OpenCLIP MHA
            part = "out" if layer.endswith("_out_proj") else n.rsplit("_", 2)[-2]
            mha.setdefault(layer.removesuffix("_out_proj"), set()).add(part)
    problems = []
    if missing:
        problems.append(f"A1111: {len(missing)} module(s) match no layer and are skipped (first: {missing[0]})")
    partial = sorted(k for k, parts in mha.items() if parts != {"q", "k", "v", "out"})
    if partial:
        problems.append(f"A1111: {len(partial)} OpenCLIP attention layer(s) lack one of q/k/v/out_proj and are silently "
                        f"never applied (first: {partial[0]}); train all four attention projections")
        hit -= sum(len(mha[k]) for k in partial)
    return hit, problems


def verify_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, arch: str | None = None,
                 model=None, path: str = "<tensors>") -> VerifyReport:
    """Check a kohya state dict; see `verify_file`."""
    groups = kohya.group(tensors)
    stray = sorted(groups.pop("", {}))
    complete = {m: p for m, p in groups.items() if "lora_down.weight" in p and "lora_up.weight" in p}
    shapes = {m: tuple(p["lora_down.weight"].shape) for m, p in complete.items()}
    if model is None and metadata.get("ss_sd_model_name") in BUILTIN:
        from sdlora.models import load_base

        model = load_base(metadata["ss_sd_model_name"])
    if model is not None:
        arch = model.arch
        table = layouts.table_of(model.components, arch)
        against = f"the loaded model '{model.name}'"
    else:
        detected = arch or guess_arch(list(groups), metadata, shapes)
        arch = detected or "sd1"
        table = layouts.kohya_table(arch)
        against = f"the real {ARCH_NAMES[arch]} architecture"
    rep = VerifyReport(path=path, arch=arch, against=against, modules=len(groups), keys=len(tensors))
    if model is None and detected is None:
        rep.notes.append("neither metadata nor names say the architecture; assumed SD 1.x (pass --model to check)")
    if not groups:
        rep.problems.append("no kohya LoRA modules (*.lora_down.weight / *.lora_up.weight) in the file; "
                            "convert it with `sdlora convert IN OUT --to kohya`")
    if stray:
        rep.problems.append(f"{len(stray)} key(s) are not kohya LoRA keys (first: {stray[0]}); kohya-format loaders "
                            "skip or reject them")
    half = sorted(set(groups) - set(complete))
    if half:
        rep.problems.append(f"{len(half)} module(s) lack lora_down or lora_up (first: {half[0]})")
    no_alpha = sorted(m for m in groups if "alpha" not in groups[m])
    if no_alpha:
        rep.problems.append(f"{len(no_alpha)} module(s) have no alpha (first: {no_alpha[0]}); every loader then uses "
                            "scale 1 silently; re-save with alpha (e.g. `sdlora convert --to kohya --alpha-if-missing RANK`)")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        rep.problems.append(f"{len(bad)} tensor(s) hold NaN or Inf (first: {bad[0]}); the adapter is broken, retrain")

    canonical, unknown, shape_bad = {}, [], []
    alias = layouts.aliases(table, arch)
    for m, p in complete.items():
        c = m if m in table else alias.get(m)
        if c is None:
            unknown.append(m)
            continue
        canonical[m] = c
        why = _shape_problem(p["lora_down.weight"], p["lora_up.weight"], table[c])
        if why:
            shape_bad.append(f"{m}: {why}")
        elif p["lora_down.weight"].shape[0] != p["lora_up.weight"].shape[1]:
            shape_bad.append(f"{m}: rank of lora_down and lora_up differ")
    if unknown:
        rep.problems.append(f"kohya: {len(unknown)} module(s) name no module of {against} (first: {unknown[0]})")
    if shape_bad:
        rep.problems.append(f"{len(shape_bad)} module(s) have shapes that do not fit (no loader may reshape them "
                            f"silently); first: {shape_bad[0]}")
    if alias and any(m in alias for m in complete):
        rep.notes.append("SDXL UNet modules use diffusers-style names; kohya's canonical names are the SGM ones "
                         "(`sdlora convert IN OUT --to kohya` rewrites them)")
    zero = [m for m, p in complete.items()
            if not p["lora_up.weight"].float().abs().sum() or not p["lora_down.weight"].float().abs().sum()]
    if complete and len(zero) == len(complete):
        rep.problems.append("the delta is empty: every module has an all-zero lora_up or lora_down; the adapter has "
                            "no effect (train longer or with a higher learning rate)")
    elif zero:
        rep.notes.append(f"{len(zero)} of {len(complete)} modules have a zero delta")

    names = sorted(complete)
    n = len(names)
    rep.tools["kohya"] = f"loads {len(canonical)}/{n} modules"
    if complete:
        landed, probs = _diffusers_check(complete, arch, table)
        rep.problems += probs
        rep.tools["diffusers"] = (f"load_lora_weights loads {landed}/{n} modules" if not probs or landed
                                  else "load_lora_weights rejects the file")
        comfy = layouts.comfy_keys(arch)
        not_comfy = [m for m in names if m not in comfy]
        if not_comfy:
            rep.problems.append(f"ComfyUI: {len(not_comfy)} module(s) give 'lora key not loaded' (first: {not_comfy[0]})")
        rep.tools["ComfyUI"] = f"loads {n - len(not_comfy)}/{n} modules; lists every file in models/loras"
        hit, probs = _a1111_check(names, arch)
        rep.problems += probs
        listed = file_arch(metadata)
        if listed is None:
            listing = "lists it with every checkpoint (no metadata)"
        else:
            listing = f"lists it only while an {ARCH_NAMES[listed]} checkpoint is loaded"
            if listed != arch:
                rep.problems.append(f"A1111 files it under {ARCH_NAMES[listed]} (ss_base_model_version="
                                    f"{metadata.get('ss_base_model_version', '')!r}, ss_v2={metadata.get('ss_v2')!r}) but "
                                    f"it is an {ARCH_NAMES[arch]} LoRA, so it is hidden with the right checkpoint; "
                                    "fix the metadata")
        rep.tools["A1111"] = f"applies {hit}/{n} modules; {listing}"
    return rep


def verify_file(path, arch: str | None = None, model=None) -> VerifyReport:
    """Verify a kohya LoRA file. Without `model`, names and shapes are checked against the real architecture
    (`arch`, else what the metadata and names say) built on the meta device; a file whose `ss_sd_model_name` is a
    built-in model (tiny, toy) is checked against that model. `model` is a loaded `sdlora.models.BaseModel`."""
    tensors, metadata = io.load(Path(path))
    return verify_state(tensors, metadata, arch=arch, model=model, path=str(path))


def add_verify_args(p) -> None:
    p.add_argument("file", help="kohya LoRA .safetensors")
    p.add_argument("--model", default=None, help="check against this loaded model ('tiny', a diffusers folder, a "
                   ".safetensors checkpoint or a hub id) instead of the architecture built from public configs")
    p.add_argument("--arch", choices=kohya.ARCHS, default=None, help="architecture to check against (default: "
                   "from the metadata and key names)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_verify(args) -> int:
    model = None
    if args.model:
        from sdlora.models import load_base

        model = load_base(args.model)
    rep = verify_file(args.file, arch=args.arch, model=model)
    if args.json:
        print(json.dumps({"ok": rep.ok, "arch": rep.arch, "modules": rep.modules, "keys": rep.keys,
                          "problems": rep.problems, "notes": rep.notes, "tools": rep.tools}, indent=2))
    else:
        print("\n".join(rep.lines()))
    return 0 if rep.ok else 1


def require_ok(path, model=None) -> VerifyReport:
    """verify_file, raising SdloraError with the first problem when the file is not OK (for use after a save)."""
    rep = verify_file(path, model=model)
    if not rep.ok:
        raise SdloraError(f"{path}: verify failed: {rep.problems[0]} ({len(rep.problems)} problem(s); "
                          f"run `sdlora verify {path}`)")
    return rep
