"""FLUX.1 and SD 3.5 loaded piece by piece, from the files people keep (BFL / SAI single files with separate
`--clip-l`, `--clip-g`, `--t5xxl`, `--ae` parts; sdlora/formats/bigfiles.py says what is where) and from diffusers
folders (sharded) alike, offline.

Each component is planned first from the safetensors headers alone: its config (from the tensors' shapes), where
each of its tensors comes from, and the bytes it will take at its precision. The plan is checked before anything
is read — a missing part, a T5 file of another model, a model that will not fit the host's memory at the chosen
precision: one line each, the last naming a precision that would fit. Then every component is built on the meta
device and given its weights block by block, each block quantised (`sdlora.quant`) before the next is read
(sdlora/stream.py): the peak is the quantised model plus one block, never the whole model in bf16.

Why not diffusers' single-file converters on the weights: they take a whole state dict (24 GB for FLUX.1-dev),
and FLUX's has FLUX.1's width hard-coded. The transformer's map is `formats.dit.tensor_sources` (which
tests/test_big_files.py checks against those converters on the real-size key sets); CLIP and T5 files are in
transformers' own layout (name for name); the small VAE goes through diffusers' `convert_ldm_vae_checkpoint` whole.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora import archs
from sdlora.archs import ArchSpec
from sdlora.errors import SdloraError
from sdlora.formats import bigfiles, dit
from sdlora.stream import Files, check_sources, materialise

GB = 1e9
# bytes per parameter of the weights that quantisation leaves alone (norms, biases) and of modes without `quant`
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTISED_READ = torch.bfloat16  # what fp8/int8/nf4 weights are read as before quantising (files are bf16 or fp8)


@dataclass
class LoadOptions:
    """How to load a big model: precisions (None: fp32), the separate part files, T5's token length, and whether
    the denoiser waits (`defer_denoiser`: built on meta, loaded by `BaseModel.materialise`)."""

    base_precision: str | None = None
    te_precision: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    t5_max_length: int | None = None
    defer_denoiser: bool = False
    # what fp8/int8/nf4 layers compute in: the run's mixed precision (bf16 on most GPUs); fp32 without one, as on a
    # CPU without bf16 instructions, where a bf16 matmul is several times slower than an fp32 one
    compute: torch.dtype = torch.bfloat16

    def mode(self, attr: str, spec: ArchSpec) -> str:
        if attr == spec.denoiser:
            return self.base_precision or "fp32"
        if attr == "vae":
            return "fp32"  # the VAE only encodes, in fp32 (the loop casts it anyway)
        return self.te_precision or "fp32"


def load_options(cfg, defer_denoiser: bool = False) -> LoadOptions:
    """The LoadOptions a TrainConfig (or any object with its fields) asks for."""
    return LoadOptions(base_precision=getattr(cfg, "base_precision", None),
                       te_precision=getattr(cfg, "te_precision", None), clip_l=cfg.clip_l, clip_g=cfg.clip_g,
                       t5xxl=cfg.t5xxl, ae=cfg.ae, t5_max_length=cfg.t5xxl_max_token_length,
                       defer_denoiser=defer_denoiser, compute=compute_dtype(getattr(cfg, "mixed_precision", "bf16")))


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype quantised layers compute in under `--mixed-precision` ("no": fp32)."""
    return _DTYPES["fp32" if mixed_precision == "no" else mixed_precision]


@dataclass
class Component:
    """One module to build: its config, where its tensors are, and at what precision."""

    attr: str
    cfg: dict
    files: Files
    sources: dict | None  # parameter -> pieces; None: the VAE, converted whole
    mode: str
    what: str  # for messages: "flux1-dev.safetensors's transformer", "t5xxl.safetensors"
    flag: str = ""  # "; pass the right file with --t5xxl" for messages
    prefix: str = ""
    compute: torch.dtype = torch.bfloat16  # what its quantised layers compute in (LoadOptions.compute)
    _counts: tuple | None = None

    def meta(self):
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta, buffers real (CLIP's position ids)
            return archs.build(self.cfg)

    def counts(self) -> tuple[int, int, int]:
        """(values in weight matrices, other values, values of the largest block), from the meta model (cached)."""
        if self._counts is None:
            from sdlora.stream import blocks

            model = self.meta()
            ps = list(model.parameters())
            biggest = max((sum(p.numel() for p in b.parameters()) for _, b in blocks(model)), default=0)
            self._counts = (sum(p.numel() for p in ps if p.dim() >= 2), sum(p.numel() for p in ps if p.dim() < 2),
                            biggest if self.sources is not None else 0)
        return self._counts

    def nbytes(self, mode: str | None = None) -> int:
        """Host bytes of the built component at `mode` (default its own): weight matrices at that precision,
        everything else in its compute dtype."""
        mode = mode or self.mode
        matrices, other, _ = self.counts()
        return int(matrices * bytes_per_param(mode) + other * torch.finfo(load_dtype(mode)).bits // 8)

    def build(self, counter: dict | None = None):
        if self.sources is None:
            return _vae(self)
        model = self.meta()
        quantize = None
        if self.mode not in _DTYPES:
            from sdlora import quant

            def quantize(name, block):
                new = quant.quantize_(block, self.mode, self.compute, prefix=name)
                if new is not block:  # the block was one Linear layer, replaced
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, attr, new)
        model = materialise(model, self.sources, self.files, load_dtype(self.mode), quantize, counter)
        if quantize is not None:
            _to_compute(model, self.compute)
        return model


def _to_compute(model: torch.nn.Module, compute: torch.dtype) -> None:
    """The weights quantisation left alone (norms, biases, embedders), read as QUANTISED_READ, to the dtype the
    quantised layers compute in: an fp8 layer returns `compute`, and a bf16 LayerNorm after it refuses an fp32
    input on the CPU ("mixed dtype")."""
    from sdlora import quant

    for sub in model.modules():
        if quant.stored(sub):
            continue
        for name, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is not None and t.is_floating_point() and t.dtype != compute:
                t.data = t.data.to(compute)


def load_dtype(mode: str) -> torch.dtype:
    return _DTYPES.get(mode, QUANTISED_READ)


def bytes_per_param(mode: str) -> float:
    try:
        from sdlora import quant
    except ImportError:  # TEMPORARY until big-quant's sdlora.quant is merged
        return {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "nf4": 0.5}[mode]
    return quant.bytes_per_param(mode)


# ---------------------------------------------------------------- planning a single file


def file_components(path: Path, arch: str, prefix: str, opts: LoadOptions) -> tuple[ArchSpec, dict[str, Component]]:
    """The components of BFL/SAI single file `path` (family `arch`, denoiser under `prefix`), its missing parts
    taken from `opts`' part files; refused in one line when a part is missing or of another model."""
    spec = archs.get(arch)
    files = Files.open([path])
    den_cfg = bigfiles.denoiser_config(arch, files.shapes, prefix, files.metadata)
    comps = {spec.denoiser: _denoiser(spec, den_cfg, files, prefix, opts, path.name)}
    missing = []
    for attr in [t.attr for t in spec.text_encoders] + ["vae"]:
        role = bigfiles.role_of(spec, attr)
        flag, _ = bigfiles.ROLES[role]
        p = bigfiles.part_prefix(files.keys(), spec, role, alone=False)
        part_files, what, given = files, f"{path.name}'s {role}", None
        if p is None:
            given = getattr(opts, role)
            if not given:
                missing.append(role)
                continue
            part_files = Files.open([_existing(given, flag)])
            p = bigfiles.part_prefix(part_files.keys(), spec, role, alone=True)
            what = Path(given).name
            if p is None:
                raise SdloraError(f"{given} (given with {flag}) holds no {role} weights; pass the {role} file "
                                  f"(e.g. {bigfiles.USUAL_FILE[role]}) with {flag}")
        comps[attr] = _part(spec, attr, role, part_files, p, opts, what, f"; pass the {role} file with {flag}")
    if missing:
        raise SdloraError(f"{path.name} has no {', '.join(missing)} weights; pass "
                          + " and ".join(f"{bigfiles.ROLES[r][0]} {bigfiles.USUAL_FILE[r]}" for r in missing))
    _check_fit(spec, comps)
    return spec, comps


def _existing(given: str, flag: str) -> Path:
    p = Path(given).expanduser()
    if not p.is_file():
        raise SdloraError(f"{given} (given with {flag}): no such file; pass an existing .safetensors file")
    return p


def _denoiser(spec, cfg, files, prefix, opts, name) -> Component:
    comp = Component(spec.denoiser, cfg, files, None, opts.mode(spec.denoiser, spec), f"{name}'s transformer",
                     compute=opts.compute)
    model = comp.meta()
    comp.sources = {k: tuple((prefix + o, a, b) for o, a, b in v)
                    for k, v in dit.tensor_sources(spec.id, model).items()}
    return comp


def _part(spec, attr, role, files, prefix, opts, what, flag) -> Component:
    md = files.metadata
    if role == "ae":
        return Component(attr, bigfiles.vae_config(files.shapes, spec, prefix, md), files, None, "fp32", what, flag,
                         prefix)
    if role == "t5xxl":
        cfg = bigfiles.t5_config(files.shapes, spec, attr, prefix, md)
    else:
        cfg = bigfiles.clip_config(files.shapes, spec, attr, prefix, md)
    comp = Component(attr, cfg, files, None, opts.mode(attr, spec), what, flag, prefix, compute=opts.compute)
    comp.sources = bigfiles.identity_sources(comp.meta(), prefix, files.keys())
    return comp


def _check_fit(spec: ArchSpec, comps: dict[str, Component]) -> None:
    """The text encoders fit the denoiser (T5's width is its text input, the CLIPs' pooled widths its pooled
    input), and every tensor is there with the right shape: before anything is read."""
    den = comps[spec.denoiser].cfg
    label = f"{spec.label} {spec.variant(den, 'flow')}"
    pooled = 0
    for t in spec.text_encoders:
        c = comps[t.attr]
        if t.kind == "t5" and c.cfg["d_model"] != den["joint_attention_dim"]:
            raise SdloraError(f"{c.what}: a T5 encoder {c.cfg['d_model']} wide; {label} takes T5-XXL "
                              f"({den['joint_attention_dim']} wide){c.flag}")
        if t.pooled:
            pooled += c.cfg["hidden_size"] if t.pooled_from == "pooler_output" else c.cfg.get("projection_dim", 0)
    if pooled != den["pooled_projection_dim"]:
        names = " + ".join(comps[t.attr].what for t in spec.text_encoders if t.pooled)
        raise SdloraError(f"{names}: pooled text {pooled} wide, {label} takes {den['pooled_projection_dim']}; "
                          f"pass the CLIP files made for it")
    for c in comps.values():
        if c.sources is not None:
            check_sources(c.meta(), c.sources, c.files, c.what, c.flag)


def _vae(c: Component):
    """The VAE (0.08 B parameters), read whole and converted by diffusers' own LDM converter."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sdlora.formats.checkpoint import VAE, _load

    keys = [k for k in c.files.keys() if k.startswith(c.prefix)]
    tensors = c.files.read({k: ((k, None, None),) for k in keys}, torch.float32)
    ldm = {VAE + k[len(c.prefix):]: v for k, v in tensors.items()}
    return _load(lambda cfg: diffusers.AutoencoderKL.from_config(cfg), c.cfg, convert_ldm_vae_checkpoint(ldm, c.cfg),
                 "VAE")


# ---------------------------------------------------------------- planning a diffusers folder


def folder_components(path: Path, spec: ArchSpec, opts: LoadOptions) -> dict[str, Component]:
    """The components of a diffusers folder (sharded or not), each tensor by its own name."""
    comps = {}
    for attr in [spec.denoiser, *(t.attr for t in spec.text_encoders), "vae"]:
        sub = path / attr
        shards = sorted(sub.glob("*.safetensors"))
        if not shards or not (sub / "config.json").is_file():
            raise SdloraError(f"{sub}: no config.json and .safetensors weights; the folder is incomplete (a .bin "
                              "folder: convert it to .safetensors)")
        files = Files.open(shards)
        comp = Component(attr, json.loads((sub / "config.json").read_text()), files, None, opts.mode(attr, spec),
                         f"{path.name}/{attr}", compute=opts.compute)
        model = comp.meta()
        comp.sources = bigfiles.identity_sources(model, "", files.keys())
        comps[attr] = comp
    _check_fit(spec, {a: c for a, c in comps.items()})
    return comps


# ---------------------------------------------------------------- host memory


def host_available() -> int:
    """Bytes this process may still take: MemAvailable, or less under a cgroup (v2 or v1) limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim, cur = Path(limit).read_text().strip(), int(Path(used).read_text())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 1 << 60:
            avail = min(avail or 1 << 62, int(lim) - cur)
    return avail if avail is not None else 1 << 62


def planned_peak(spec: ArchSpec, sizes: dict[str, int], deferred: bool) -> int:
    """Host bytes at the fullest moment: with the denoiser deferred, the text encoders (and VAE) first, then the
    denoiser beside the CLIP encoders and VAE (T5 gone); else everything at once."""
    tes = sum(sizes[t.attr] for t in spec.text_encoders)
    clips = sum(sizes[t.attr] for t in spec.text_encoders if t.kind != "t5")
    if deferred:
        return max(tes, sizes[spec.denoiser] + clips) + sizes["vae"]
    return sum(sizes.values())


def check_host_memory(spec: ArchSpec, comps: dict[str, Component], opts: LoadOptions, name: str,
                      available: int | None = None) -> dict[str, int]:
    """Refuse, before reading a weight, a model whose planned host memory exceeds what is available, naming the
    precisions that would fit. Returns the planned bytes per component."""
    available = host_available() if available is None else available

    def peak(o: LoadOptions) -> tuple[int, dict]:
        sizes = {a: c.nbytes(o.mode(a, spec)) for a, c in comps.items()}
        block = max(c.counts()[2] * torch.finfo(load_dtype(o.mode(a, spec))).bits // 8 for a, c in comps.items())
        return planned_peak(spec, sizes, o.defer_denoiser) + block, sizes

    need, sizes = peak(opts)
    if need <= available:
        return sizes
    detail = ", ".join(f"{a} {s / GB:.1f} GB" for a, s in sizes.items())
    fits = None
    for base in ("bf16", "fp8", "nf4"):
        for te in ("bf16", "fp8", "nf4"):
            o = dataclasses.replace(opts, base_precision=base, te_precision=te)
            if fits is None and peak(o)[0] <= available:
                fits = (base, te, peak(o)[0])
    hint = (f"--base-precision {fits[0]} --te-precision {fits[1]} needs about {fits[2] / GB:.1f} GB" if fits else
            "even nf4 does not fit: free memory or use a machine with more")
    raise SdloraError(f"{name} needs about {need / GB:.1f} GB of host memory at --base-precision "
                      f"{opts.base_precision or 'fp32'} --te-precision {opts.te_precision or 'fp32'} ({detail}, "
                      f"plus one block read at a time); {available / GB:.1f} GB are available; {hint}")


# ---------------------------------------------------------------- the model


def tokenizers_for(spec: ArchSpec, comps: dict[str, Component], folder: Path | None) -> dict:
    """Each text encoder's tokenizer: a folder's own; for single files CLIP's (built from the shipped BPE file)
    and T5's from the local Hugging Face cache or $SDLORA_T5_TOKENIZER (no tokenizer file ships with sdlora)."""
    import transformers

    from sdlora.formats.checkpoint import _tokenizer

    out = {}
    index = json.loads((folder / "model_index.json").read_text()) if folder else {}
    for t in spec.text_encoders:
        if folder:
            cls = index.get(t.tokenizer_attr, [None, "AutoTokenizer"])[1]
            out[t.tokenizer_attr] = getattr(transformers, cls).from_pretrained(str(folder / t.tokenizer_attr))
        elif t.kind == "t5":
            out[t.tokenizer_attr] = _t5_tokenizer(comps[t.attr].cfg["vocab_size"], t)
        else:
            out[t.tokenizer_attr] = _tokenizer(comps[t.attr].cfg["vocab_size"], t)
    return out


def _t5_tokenizer(vocab: int, t):
    import os

    from sdlora.formats.checkpoint import _tokenizer

    where = os.environ.get("SDLORA_T5_TOKENIZER")
    try:
        if where:
            import transformers

            return transformers.AutoTokenizer.from_pretrained(where)
        if vocab != 32128:
            return _tokenizer(vocab, t)  # sdlora's test-sized T5s use the tiny tokenizer
        from transformers import T5TokenizerFast

        return T5TokenizerFast.from_pretrained("google/t5-v1_1-xxl", local_files_only=True)
    except (OSError, ValueError) as e:
        raise SdloraError("T5-XXL's tokenizer is not on this machine (sdlora does not ship it); download "
                          "google/t5-v1_1-xxl's tokenizer files once (`hf download google/t5-v1_1-xxl spiece.model "
                          "tokenizer_config.json special_tokens_map.json`) or set SDLORA_T5_TOKENIZER to a folder "
                          f"holding them ({type(e).__name__})") from e


def with_t5_length(spec: ArchSpec, length: int | None, variant: str) -> ArchSpec:
    """`spec` with T5's token length `length`, or FLUX.1-schnell's 256 (kohya's default) when none is given."""
    if length is None and variant == "schnell":
        length = 256
    if length is None:
        return spec
    return dataclasses.replace(spec, text_encoders=tuple(
        dataclasses.replace(t, max_length=length) if t.kind == "t5" else t for t in spec.text_encoders))


def load(name: str, spec: ArchSpec, comps: dict[str, Component], opts: LoadOptions, folder: Path | None):
    """(spec with T5's length, parts for `models.from_components`) of planned components: memory checked, text
    encoders and VAE built, the denoiser built now or left on meta (`opts.defer_denoiser`)."""
    check_host_memory(spec, comps, opts, name)
    den = comps[spec.denoiser].cfg
    variant = spec.variant(den, "flow")
    parts: dict = tokenizers_for(spec, comps, folder)
    for attr, c in comps.items():
        if attr != spec.denoiser:
            parts[attr] = c.build()
    parts[spec.denoiser] = comps[spec.denoiser].meta() if opts.defer_denoiser else comps[spec.denoiser].build()
    if folder:
        parts["scheduler_config"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    else:
        parts["scheduler_config"] = archs.load_config(spec.id, "scheduler_schnell" if variant == "schnell"
                                                      and spec.id == "flux" else "scheduler")
    return with_t5_length(spec, opts.t5_max_length, variant), parts
