"""What `sdlora verify` checks: does a LoRA file load, fully and with the right shapes, in kohya, diffusers,
ComfyUI and A1111, and will A1111 list it? Checks names against the real architecture (meta device, no weights)
or a loaded model; never needs a download. Works on the neutral `AdapterFile` (formats/read.py), so any layout
sdlora reads is checked the same way; a damaged file (NaN, rank 0, bad shapes) is refused by the reader with one
line. The command line is in `sdlora/cli_formats.py`.
"""

from __future__ import annotations

import json
import types
from collections import Counter
from dataclasses import dataclass, field

from sdlora import archs
from sdlora.errors import cause
from sdlora.formats import embeddings as emb
from sdlora.formats import kohya, layouts
from sdlora.formats.adapter import AdapterFile, AdapterModule, check_module
from sdlora.formats.read import read_adapter
from sdlora.lora import kinds


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
        out = [f"{self.path}: {archs.label(self.arch)} LoRA, {self.modules} modules, {self.keys} keys "
               f"(checked against {self.against})"]
        out += [f"  {tool:9s} {line}" for tool, line in self.tools.items()]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  PROBLEM: {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return out


def file_arch(metadata: dict[str, str]) -> str | None:
    """What A1111 files the LoRA under (network.py NetworkOnDisk, its own rule on the metadata): None = unknown
    (listed with every checkpoint)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "sdxl"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return "sd1" if metadata else None


def _shape_problem(m: AdapterModule, want: layouts.Module) -> str | None:
    if not m.kind_spec.pair or "mid" in m.tensors:
        if m.fits(want.shape):
            return None
        return f"{m.kind} delta {list(m.shape)} where the model's weight is {list(want.shape)}"
    down, up, r = m.tensors["down"], m.tensors["up"], m.rank
    got = (list(down.shape), list(up.shape))
    if want.conv:
        want_down, want_up = [r, want.shape[1], *want.shape[2:]], [want.shape[0], r, 1, 1]
    else:
        want_down, want_up = [r, want.shape[1]], [want.shape[0], r]
    if got != (want_down, want_up):
        return f"down {got[0]} / up {got[1]} where the model needs {want_down} / {want_up}"
    if m.dora:
        mag = list(m.tensors["magnitude"].shape)
        axes = ([1, want.shape[1], *[1] * (len(want.shape) - 2)], [want.shape[0], 1, *[1] * (len(want.shape) - 2)])
        if mag not in axes:
            return f"dora_scale {mag} where the model needs {axes[0]} (per input) or {axes[1]} (per output)"
    return None


def _diffusers_check(adapter: AdapterFile, arch: str, table: dict[str, layouts.Module]) -> tuple[int, list[str]]:
    """Run diffusers' own kohya reading (the public `lora_state_dict` that `load_lora_weights` calls) and look the
    resulting PEFT module names up. Returns (modules that land on a real module, problems)."""
    import diffusers
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    spec = archs.get(arch)
    if spec.denoiser_names == "original":
        return _diffusers_dit_check(adapter, arch, table)
    sd = kohya.to_tensors(adapter)
    if not all(kohya.component_of(k) for k in sd):
        return 0, ["diffusers: keys without a kohya component prefix: load_lora_weights does not read it as kohya"]
    unet_config = None
    if spec.denoiser_names == "ldm":  # diffusers maps SGM block numbers with the UNet's config
        unet_config = types.SimpleNamespace(**archs.load_config(arch, spec.denoiser))
    try:
        new, _ = getattr(diffusers, spec.pipeline).lora_state_dict(dict(sd), unet_config=unet_config)
        parts = {}
        for comp in spec.components.values():
            sub = {k[len(comp) + 1:]: v for k, v in new.items() if k.startswith(comp + ".")}
            if sub:
                parts[comp] = (convert_unet_state_dict_to_peft(sub) if comp == spec.denoiser
                               else convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub)))
    except (ValueError, KeyError) as e:
        return 0, [f"diffusers: load_lora_weights rejects the file ({cause(e, 160)})"]
    known = {(spec.components[m.component], m.path) for m in table.values()}
    landed, missing = 0, []
    for comp, sub in parts.items():
        for k in sub:
            if ".lora_A." not in k:
                continue
            path = k.split(".lora_A.")[0]
            path = kohya.te_path(path) if comp != spec.denoiser else path
            if (comp, path) in known:
                landed += 1
            else:
                missing.append(f"{comp}.{path}")
    problems = []
    if missing:
        problems.append(f"diffusers: {len(missing)} module(s) convert to names the model lacks "
                        f"(peft 'unexpected keys'; first: {missing[0]})")
    return landed, problems


def _split_qkv_pitfall(metadata: dict[str, str], modules: dict[str, AdapterModule], table) -> int:
    """How many fused modules a kohya `split_qkv` file holds with the alpha kohya forgot to scale (§7.6): the file
    says split_qkv in its network args and the module's alpha equals a single part's rank, not the fused rank."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return 0
    if not isinstance(args, dict) or str(args.get("split_qkv", "")).lower() != "true":
        return 0
    n = 0
    for name, m in modules.items():
        parts = {p for p, _, _ in table[name].parts} if name in table else set()
        if len(parts) > 1 and m.kind_spec is kinds.LORA and m.alpha is not None and m.rank % len(parts) == 0 \
                and m.alpha <= m.rank // len(parts):
            n += 1
    return n


def _diffusers_path(m: layouts.Module, comp: str, spec) -> str:
    return m.module_path if comp == spec.denoiser else m.path


def _diffusers_dit_check(adapter: AdapterFile, arch: str, table: dict[str, layouts.Module]) -> tuple[int, list[str]]:
    """SD 3.x / FLUX.1: diffusers' SD3 loader has no kohya reader and its FLUX one hard-codes FLUX.1's real widths,
    so what is checked is the file's `sdlora convert --to diffusers` form, through diffusers' public
    `lora_state_dict`: every module must arrive on the diffusers modules its parts name (T5-XXL modules aside:
    diffusers loads no T5 LoRA)."""
    import diffusers

    from sdlora.formats.convert import to_diffusers

    spec = archs.get(arch)
    placed = {n: (table[n], m) for n, m in adapter.modules.items() if n in table and table[n].component != "te3"}
    tensors, _ = to_diffusers(placed, adapter, arch)
    try:
        new = getattr(diffusers, spec.pipeline).lora_state_dict(dict(tensors))
        new = new[0] if isinstance(new, tuple) else new
    except (ValueError, KeyError, AssertionError) as e:
        return 0, [f"diffusers: load_lora_weights rejects the converted file ({cause(e, 160)})"]
    got = {k.split(".lora_A.")[0] for k in new if ".lora_A." in k}
    comps = spec.components
    known = set()
    for m in table.values():
        comp = comps[m.component]
        prefix = comp + "." + ("" if comp == spec.denoiser else "text_model.")
        known |= {prefix + p for p, _, _ in m.parts} if m.parts else {prefix + _diffusers_path(m, comp, spec)}
    landed, missing = 0, []
    for name, (where, m) in placed.items():
        comp = comps[where.component]
        prefix = comp + "." + ("" if comp == spec.denoiser else "text_model.")
        want = {prefix + p for p, _, _ in where.parts} if where.parts else {prefix + _diffusers_path(where, comp, spec)}
        if want & got and (want & got) <= known:
            landed += 1
        else:
            missing.append(name)
    problems = []
    stray = sorted(got - known)
    if stray:
        problems.append(f"diffusers: {len(stray)} converted module(s) name no module of the model (first: {stray[0]})")
    if missing:
        problems.append(f"diffusers: {len(missing)} module(s) do not arrive (first: {missing[0]})")
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
        problems.append(f"A1111: {len(partial)} OpenCLIP attention layer(s) lack one of q/k/v/out_proj and are "
                        f"silently never applied (first: {partial[0]}); train all four attention projections")
        hit -= sum(len(mha[k]) for k in partial)
    return hit, problems


def verify(adapter: AdapterFile, *, arch: str | None = None, model=None, path: str | None = None) -> VerifyReport:
    """Check an adapter against what kohya, diffusers, ComfyUI and A1111 load. Without `model`, names and shapes are
    checked against the real architecture (`arch`, else what the file says) built on the meta device; a file whose
    `ss_sd_model_name` is a built-in model (tiny, toy) is checked against that model. `model` is a loaded
    `sdlora.models.BaseModel`."""
    from sdlora.models import BUILTIN_MODELS, load_base

    metadata = adapter.metadata
    path = path or str(adapter.path or "<adapter>")
    for m in adapter.modules.values():
        check_module(m, path)
    if model is None and metadata.get("ss_sd_model_name") in BUILTIN_MODELS:
        model = load_base(metadata["ss_sd_model_name"])
    detected = None
    if model is not None:
        arch = model.arch
        table = layouts.table_of(model.components, arch)
        against = f"the loaded model '{model.name}'"
    else:
        detected = arch or adapter.arch
        arch = detected or next(iter(archs.SPECS))
        table = layouts.kohya_table(arch)
        against = f"the real {archs.label(arch)} architecture"
    modules = adapter.modules
    rep = VerifyReport(path=path, arch=arch, against=against, modules=len(modules),
                       keys=sum(len(m.tensors) + (m.alpha is not None) for m in modules.values())
                       + len(adapter.unknown))
    if model is None and detected is None:
        rep.notes.append(f"neither metadata nor names say the architecture; assumed {archs.label(arch)} "
                         "(pass --model to check)")
    if adapter.source != "kohya" and adapter.source != "sdlora":
        rep.notes.append(f"a {adapter.source} file: kohya, ComfyUI and A1111 read kohya names; the checks below are of "
                         "its kohya form (`sdlora convert IN OUT --to kohya`)")
    if adapter.unknown:
        rep.problems.append(f"{len(adapter.unknown)} key(s) are not parts of a LoRA module (first: "
                            f"{adapter.unknown[0]}); kohya-format loaders skip or reject them")
    no_alpha = sorted(n for n, m in modules.items() if m.alpha is None)
    if no_alpha:
        rep.problems.append(f"{len(no_alpha)} module(s) have no alpha (first: {no_alpha[0]}); every loader then uses "
                            "scale 1 silently; re-save with alpha "
                            "(e.g. `sdlora convert --to kohya --alpha-if-missing RANK`)")

    canonical, unknown, shape_bad = {}, [], []
    alias = layouts.aliases(table, arch)
    for n, m in modules.items():
        c = n if n in table else alias.get(n)
        if c is None:
            unknown.append(n)
            continue
        canonical[n] = c
        why = _shape_problem(m, table[c])
        if why:
            shape_bad.append(f"{n}: {why}")
    if unknown:
        rep.problems.append(f"kohya: {len(unknown)} module(s) name no module of {against} (first: {unknown[0]})")
    if shape_bad:
        rep.problems.append(f"{len(shape_bad)} module(s) have shapes that do not fit (no loader may reshape them "
                            f"silently); first: {shape_bad[0]}")
    if any(n in alias for n in modules):
        rep.notes.append("UNet modules use diffusers-style names; kohya's canonical names are the SGM ones "
                         "(`sdlora convert IN OUT --to kohya` rewrites them)")
    zero = [n for n, m in modules.items() if not all(t.float().abs().sum() for t in m.tensors.values())]
    if modules and len(zero) == len(modules) and adapter.embeddings:  # --pivotal-steps: the tokens train first
        rep.notes.append("the LoRA part is empty (every lora_up or lora_down is zero); the bundled embeddings hold "
                         "what was trained")
    elif modules and len(zero) == len(modules):
        rep.problems.append("the delta is empty: every module has an all-zero lora_up or lora_down; the adapter has "
                            "no effect (train longer or with a higher learning rate)")
    elif zero:
        rep.notes.append(f"{len(zero)} of {len(modules)} modules have a zero delta")
    split = _split_qkv_pitfall(metadata, modules, table)
    if split:
        rep.notes.append(f"written by kohya with split_qkv: the alpha of {split} fused q/k/v module(s) was not scaled "
                         "by the number of parts, so every loader (and sdlora) applies them 3-4x weaker than trained "
                         "(kohya-ss/sd-scripts#2204); multiply their alpha by 3 (qkv) or 4 (linear1) to fix it")

    rep.tools["kohya"] = f"loads {len(canonical)}/{len(modules)} modules"
    _diffusers_tool(rep, modules, metadata, arch, table)
    rep.tools["ComfyUI"] = _comfy_tool(rep, sorted(modules), arch, table)
    _a1111_tool(rep, sorted(modules), metadata, arch)
    if adapter.embeddings:
        _embeddings(rep, adapter, arch, model, path)
    return rep


def _embeddings(rep: VerifyReport, adapter: AdapterFile, arch: str, model, path: str) -> None:
    """Bundled embeddings (pivotal tuning): their widths against the text encoders, and what each tool does with
    them."""
    spec = archs.get(arch)
    clips = {t.component: t for t in spec.text_encoders if t.kind == "clip"}
    for name, vecs in adapter.embeddings.items():
        for c, v in vecs.items():
            if c not in clips:
                rep.problems.append(f"embedding '{name}': {spec.label} has no text encoder {c}")
                continue
            t = clips[c]
            width = (model.modules[t.attr].get_input_embeddings().weight.shape[1] if model is not None
                     else archs.load_config(arch, t.attr)["hidden_size"])
            if v.shape[1] != width:
                rep.problems.append(f"embedding '{name}': {c} vectors are {v.shape[1]} wide, the encoder reads {width}")
        missing = sorted(set(clips) - set(vecs))
        if missing:
            rep.problems.append(f"embedding '{name}' has no vectors for {', '.join(missing)} (A1111 needs every "
                                "CLIP encoder's)")
    rep.keys += sum(len(v) for v in adapter.embeddings.values())
    names = ", ".join(f"'{n}'" for n in adapter.embeddings)
    rep.notes.append("bundled embeddings (pivotal tuning): " + "; ".join(emb.describe(adapter.embeddings)))
    if "A1111" in rep.tools and spec.a1111:
        rep.tools["A1111"] += f"; loads the bundled embedding(s) {names} with it (bundle_emb)"
    rep.tools["ComfyUI"] += (f"; ignores bundle_emb (logs 'lora key not loaded'): put the embedding file(s) in "
                             f"models/embeddings and write embedding:{next(iter(adapter.embeddings))}")
    rep.tools["diffusers"] = (f"load_lora_weights rejects the file as written (bundle_emb keys: 'Invalid LoRA "
                              f"checkpoint'); `sdlora convert {path} OUT --to diffusers` writes the LoRA without "
                              "them and the embedding file(s) beside it (load_textual_inversion); the LoRA part: "
                              + rep.tools.get("diffusers", ""))


def _diffusers_tool(rep: VerifyReport, modules: dict[str, AdapterModule], metadata: dict[str, str], arch: str,
                    table: dict[str, layouts.Module]) -> None:
    """diffusers reads plain LoRA/LoCon pairs only (docs/lycoris-and-dit.md §5.3): other kinds are a note, not a
    problem of the file, and the check runs on what diffusers can read."""
    n = len(modules)
    plain = {k: m for k, m in modules.items() if m.kind_spec.pair and "mid" not in m.tensors}
    other = Counter(m.kind if "mid" not in m.tensors else "locon (Tucker)"
                    for k, m in modules.items() if k not in plain)
    dora = sum(m.dora for m in plain.values())
    if plain:
        lora_only = {k: AdapterModule(k, m.kind, {"down": m.tensors["down"], "up": m.tensors["up"]}, m.alpha)
                     for k, m in plain.items()}
        landed, probs = _diffusers_check(AdapterFile(lora_only, metadata), arch, table)
        rep.problems += probs
    else:
        landed, probs = 0, []
    if other:
        rep.notes.append("diffusers' load_lora_weights rejects "
                         + ", ".join(f"{c} {k}" for k, c in sorted(other.items()))
                         + " module(s) (ValueError); ComfyUI and A1111 apply them")
    if dora:
        rep.notes.append(f"diffusers drops the dora_scale of {dora} DoRA module(s) with a warning and applies them as "
                         "plain LoRA; ComfyUI and A1111 apply DoRA")
    loads = (f"load_lora_weights loads {landed}/{n} modules" if not probs or landed
             else "load_lora_weights rejects the file")
    spec = archs.get(arch)
    if plain and spec.denoiser_names == "original":  # what was checked is the converted form: say so
        loads = (f"applies none of the file as written (no kohya reader for {spec.label}); its converted form "
                 f"(`sdlora convert --to diffusers`): {loads}" if not spec.diffusers_kohya_reader else
                 f"checked on its converted form (`sdlora convert --to diffusers`, as its kohya reader assumes "
                 f"{spec.label}'s full widths): {loads}")
    rep.tools["diffusers"] = "rejects the file (LyCORIS kinds)" if not plain else loads


def _comfy_tool(rep: VerifyReport, names: list[str], arch: str, table: dict) -> str:
    comfy = layouts.comfy_keys_of(table, arch)
    not_comfy = [m for m in names if m not in comfy]
    if not_comfy:
        rep.problems.append(f"ComfyUI: {len(not_comfy)} module(s) give 'lora key not loaded' (first: {not_comfy[0]})")
    return f"loads {len(names) - len(not_comfy)}/{len(names)} modules; lists every file in models/loras"


def _a1111_tool(rep: VerifyReport, names: list[str], metadata: dict[str, str], arch: str) -> None:
    if not archs.get(arch).a1111:
        rep.tools["A1111"] = f"does not run {archs.label(arch)}; ComfyUI and Forge do"
        return
    hit, probs = _a1111_check(names, arch)
    rep.problems += probs
    listed = file_arch(metadata)
    if listed is None:
        listing = "lists it with every checkpoint (no metadata)"
    else:
        listing = f"lists it only while an {archs.label(listed)} checkpoint is loaded"
        if listed != arch:
            rep.problems.append(f"A1111 files it under {archs.label(listed)} (ss_base_model_version="
                                f"{metadata.get('ss_base_model_version', '')!r}, ss_v2={metadata.get('ss_v2')!r}) but "
                                f"it is an {archs.label(arch)} LoRA, so it is hidden with the right checkpoint; "
                                "fix the metadata")
    rep.tools["A1111"] = f"applies {hit}/{len(names)} modules; {listing}"


def verify_file(path, arch: str | None = None, model=None) -> VerifyReport:
    """Read and verify a LoRA file or PEFT folder (see `verify`)."""
    return verify(read_adapter(path), arch=arch, model=model, path=str(path))
