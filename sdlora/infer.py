"""Generation with several kohya LoRA files blended into the base model, A1111-style.

W = W0 + Σ_i s_i · (alpha_i / r_i) · up_i · down_i, with a separate strength for the UNet and for the text
encoder(s) of each adapter. The blend is fused into the model's weights, so N adapters cost no time per step.

Fusion is hand-written rather than diffusers' `load_lora_weights` + `set_adapters`, because diffusers' kohya
loader rejects valid kohya files (a text-encoder part with only q/k/v projections: "Could not automatically
infer state dict type", shared/KOHYA_FORMAT.md §6) which kohya, A1111 and ComfyUI load, and because PEFT's
weighted mix has not matched A1111's sum of deltas (huggingface/peft#643). Here every adapter file is read
once; each strength change recomputes the touched weights from a CPU fp32 backup of the original weights, so
moving a slider reads nothing from disk and repeated changes never drift.

The same `Session` drives `sdlora generate` and app.py, so both give the same image for the same settings.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats import io, kohya
from sdlora.models import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: F401  (re-exported for app.py)

ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# --scheduler value -> (diffusers class, extra config, A1111 sampler name written into the PNG)
SCHEDULERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
DEFAULT_SCHEDULER = "dpm++2m"


# ----------------------------------------------------------------------------------------------------------
# Adapter files


@dataclass
class AdapterFile:
    """A kohya LoRA file read once into memory: its modules' factors and what its metadata says."""

    path: Path
    name: str  # file stem: what `<lora:name:s>` refers to
    metadata: dict[str, str]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]  # kohya name -> (down, up, alpha)
    stray: list[str]  # keys that are not complete kohya LoRA modules (LoHa, DoRA scales, half modules, ...)
    arch: str | None  # "sd1", "sd2", "sdxl" from metadata or key names; None when nothing says
    short_hash: str  # A1111's Lora hash: sshs_model_hash[:12], else sha256 of the file[:12]

    @property
    def trigger(self) -> str:
        return self.metadata.get("modelspec.trigger_phrase", "")

    @property
    def base_version(self) -> str:
        return self.metadata.get("ss_base_model_version") or self.metadata.get("modelspec.architecture", "")


def adapter_arch(keys, metadata: dict[str, str]) -> str | None:
    """Architecture an adapter was trained for, from `ss_base_model_version`/`ss_v2`, modelspec, or its key names."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    spec = metadata.get("modelspec.architecture", "")
    for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if spec.startswith(prefix):
            return arch
    if any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_"))
           for k in keys):
        return "sdxl"
    return None


def load_adapter(path) -> AdapterFile:
    """Read a kohya LoRA file; a missing, pickle, truncated or non-LoRA file gives a one-line SdloraError."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in (".ckpt", ".pt", ".pth", ".bin"):
        raise SdloraError(f"{path}: an adapter must be a .safetensors file")
    tensors, metadata = io.load(path)
    from sdlora.formats.convert import detect_format, to_kohya

    if detect_format(tensors) in ("diffusers", "peft"):  # a diffusers/PEFT LoRA: read it under kohya names
        tensors, metadata, _ = to_kohya(tensors, metadata)
    modules, stray = {}, []
    for mod, parts in kohya.group(tensors).items():
        if mod and "lora_down.weight" in parts and "lora_up.weight" in parts:
            alpha = parts.get("alpha")
            modules[mod] = (parts["lora_down.weight"], parts["lora_up.weight"],
                            None if alpha is None else float(alpha.float().item()))
        else:
            stray += [f"{mod}.{s}" if mod else s for s in parts]
    if not modules:
        raise SdloraError(f"{path}: no kohya LoRA modules (lora_down/lora_up pairs) in this file; "
                          "pass a kohya-format LoRA .safetensors")
    short = metadata.get("sshs_model_hash", "")[:12]
    if not short:
        short = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return AdapterFile(path=path, name=path.stem, metadata=metadata, modules=modules, stray=stray,
                       arch=adapter_arch(tensors.keys(), metadata), short_hash=short)


# ----------------------------------------------------------------------------------------------------------
# Fusing a blend of adapters into the model


@dataclass
class Resolved:
    """An adapter matched against one loaded model."""

    file: AdapterFile
    targets: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float | None]]  # (component, module) -> factors
    unmatched: list[str]  # kohya module names (and stray keys) that match no module of the model


def module_table(components: dict[str, torch.nn.Module], arch: str = "sd1") -> dict[str, tuple[str, str, torch.nn.Module]]:
    """kohya module name -> (component, module name, module) for every Linear and Conv2d of the components."""
    table = {}
    for component, model in components.items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                table[kohya.kohya_name(component, name, arch)] = (component, name, module)
    return table


class Blender:
    """Fuses Σ s_i·Δ_i of the added adapters into a model's weights; strengths change without disk reads."""

    def __init__(self, base):
        self.base = base
        self.table = module_table(base.components, base.arch)
        self.adapters: dict[str, Resolved] = {}
        self.backup: dict[tuple[str, str], torch.Tensor] = {}  # original weight, CPU fp32, of every touched module
        self.strengths: dict[str, tuple[float, float]] = {}  # adapter name -> (text encoder, unet), as fused now

    def _module(self, key: tuple[str, str]) -> torch.nn.Module:
        return self.base.components[key[0]].get_submodule(key[1])

    def add(self, f: AdapterFile) -> Resolved:
        """Match `f` to the model (refusing another architecture, a file matching nothing, or wrong shapes); strength 0."""
        base = self.base
        if f.arch is not None and f.arch != base.arch:
            raise SdloraError(
                f"{f.path.name}: this adapter is for {ARCH_NAMES.get(f.arch, f.arch)} "
                f"(base version {f.base_version or 'from its key names'}), the model '{base.name}' is "
                f"{ARCH_NAMES.get(base.arch, base.arch)}; pick an adapter trained for this model")
        targets, unmatched = {}, list(f.stray)
        for kname, (down, up, alpha) in f.modules.items():
            hit = self.table.get(kname)
            if hit is None:
                unmatched.append(kname)
                continue
            component, mname, module = hit
            want = tuple(module.weight.shape)
            got = _delta_shape(down, up)
            if got != want:
                raise SdloraError(f"{f.path.name}: module {kname} has shape {list(got)} but the model's is "
                                  f"{list(want)}; the adapter was trained for a different model (size) than "
                                  f"'{base.name}'")
            targets[(component, mname)] = (down, up, alpha)
        if not targets:
            raise SdloraError(f"{f.path.name}: none of its {len(f.modules)} modules matches a module of "
                              f"'{base.name}' ({ARCH_NAMES.get(base.arch, base.arch)}); it is not a LoRA for "
                              "this model")
        name = f.name
        n = 2
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

    def remove(self, name: str) -> None:
        """Take an adapter out of the blend and restore the weights only it touched."""
        self.set_strengths({n: s for n, s in self.strengths.items() if n != name} | {name: (0.0, 0.0)})
        r = self.adapters.pop(name)
        del self.strengths[name]
        still = {k for a in self.adapters.values() for k in a.targets}
        for key in set(r.targets) - still:
            del self.backup[key]

    def set_strengths(self, strengths: dict[str, float | tuple[float, float]]) -> None:
        """Fuse W = W0 + Σ s_i·Δ_i. `strengths`: name -> s (both parts) or (text encoder, unet); absent = 0.

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
        with torch.no_grad():
            for key in dirty:
                weight = self._module(key).weight
                dev = weight.device  # fp32 arithmetic where the weight lives (the GPU, when there is one)
                w = self.backup[key].to(dev, copy=True)
                for name, r in self.adapters.items():
                    s = new[name][1] if key[0] == "unet" else new[name][0]
                    if s != 0.0 and key in r.targets:
                        down, up, alpha = r.targets[key]
                        w += s * kohya.delta(down.to(dev), up.to(dev), alpha)
                weight.copy_(w.to(weight.dtype))
        self.strengths = new

    def active(self) -> list[tuple[Resolved, float, float]]:
        """Adapters fused with a non-zero strength: (adapter, text-encoder strength, unet strength)."""
        return [(self.adapters[n], te, u) for n, (te, u) in self.strengths.items() if te != 0.0 or u != 0.0]


def _delta_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    if down.dim() == 4:
        return (up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return (up.shape[0], down.shape[1])


# ----------------------------------------------------------------------------------------------------------
# A1111 `parameters` PNG text chunk


@dataclass
class LoraRef:
    name: str
    te: float
    unet: float
    hash: str = ""

    def tag(self) -> str:
        """A1111 prompt syntax: <lora:name:s>, or <lora:name:te:unet> when the two differ."""
        if self.te == self.unet:
            return f"<lora:{self.name}:{_num(self.te)}>"
        return f"<lora:{self.name}:{_num(self.te)}:{_num(self.unet)}>"


@dataclass
class ImageParams:
    prompt: str
    negative: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    loras: list[LoraRef] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # other "Key: value" fields (e.g. Version)


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _quote(text: str) -> str:
    """A1111's quoting of a field value: JSON-quoted when it holds ',', ':', '"' or a newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _unquote(text: str) -> str:
    if text.startswith('"') and text.endswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^:>]+)(?::([^:>]+))?>")


def format_parameters(p: ImageParams) -> str:
    """The A1111 `parameters` text: prompt with <lora:..> tags, 'Negative prompt:' line, 'Key: value, ...' line."""
    prompt = " ".join([p.prompt] + [l.tag() for l in p.loras]) if p.loras else p.prompt
    fields = {"Steps": str(p.steps), "Sampler": p.sampler, "CFG scale": _num(p.cfg), "Seed": str(p.seed),
              "Size": f"{p.width}x{p.height}", "Model": p.model}
    if p.loras:
        fields["Lora hashes"] = ", ".join(f"{l.name}: {l.hash}" for l in p.loras)
    fields.update(p.extra)
    lines = [prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> ImageParams:
    """Read an A1111 `parameters` text (as written by A1111 or by format_parameters) back."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        fields = {k: _unquote(v) for k, v in _FIELD.findall(lines.pop())}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    prompt_text = "\n".join(prompt)
    hashes = {}
    for item in fields.pop("Lora hashes", "").split(","):
        if ":" in item:
            n, h = item.rsplit(":", 1)
            hashes[n.strip()] = h.strip()
    loras = []
    for m in _LORA_TAG.finditer(prompt_text):
        te = float(m.group(2))
        loras.append(LoraRef(m.group(1), te, float(m.group(3)) if m.group(3) else te, hashes.get(m.group(1), "")))
    prompt_text = _LORA_TAG.sub("", prompt_text)
    w, _, h = fields.pop("Size", "512x512").partition("x")
    return ImageParams(prompt=prompt_text, negative="\n".join(negative), steps=int(fields.pop("Steps", 20)),
                       sampler=fields.pop("Sampler", ""), cfg=float(fields.pop("CFG scale", 7)),
                       seed=int(fields.pop("Seed", 0)), width=int(w), height=int(h), model=fields.pop("Model", ""),
                       loras=loras, extra=fields)


def save_png(image, path, parameters: str) -> Path:
    """Write `image` as PNG with an A1111 `parameters` text chunk, atomically (temp file + rename)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = _io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path) -> ImageParams:
    """The `parameters` chunk of a PNG, parsed."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get("parameters")
    if text is None:
        raise SdloraError(f"{path}: PNG has no 'parameters' text chunk")
    return parse_parameters(text)


# ----------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Settings:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = DEFAULT_SCHEDULER
    width: int | None = None  # None: the model's native resolution
    height: int | None = None
    num_images: int = 1

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise SdloraError(f"unknown scheduler '{self.scheduler}'; use one of: {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise SdloraError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise SdloraError(f"the number of images must be at least 1, got {self.num_images}")
        if not math.isfinite(self.guidance):
            raise SdloraError(f"guidance must be a finite number, got {self.guidance}")
        for v in (self.width, self.height):
            if v is not None and (v < 8 or v % 8):
                raise SdloraError(f"image size must be a positive multiple of 8, got {v}")
        if not 0 <= self.seed < 2**63:
            raise SdloraError(f"seed must be between 0 and 2^63-1, got {self.seed}")


def make_scheduler(name: str, config: dict):
    import diffusers

    cls, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(dict(config), **extra)


class Session:
    """A loaded base model with its adapters: what `sdlora generate` and app.py both drive. Thread-safe."""

    def __init__(self, model: str = "tiny", base=None):
        from sdlora.models import load_base

        self.base = base if base is not None else load_base(model)
        self.blender = Blender(self.base)
        self.lock = threading.RLock()

    def use_model(self, model: str) -> list[str]:
        """Switch the base model, keeping the adapters that fit it (from memory); returns one line per dropped adapter."""
        from sdlora.models import load_base

        with self.lock:
            if model == self.base.name:
                return []
            files = [r.file for r in self.blender.adapters.values()]
            self.blender.set_strengths({})
            self.base = load_base(model)
            self.blender = Blender(self.base)
            dropped = []
            for f in files:
                f.name = f.path.stem
                try:
                    self.blender.add(f)
                except SdloraError as e:
                    dropped.append(str(e))
            return dropped

    def add(self, path) -> Resolved:
        """Read an adapter file (once) and match it to the model; raises SdloraError when it does not fit."""
        f = load_adapter(path)
        with self.lock:
            return self.blender.add(f)

    def generate(self, settings: Settings, strengths: dict[str, float | tuple[float, float]],
                 progress: bool = False):
        """Images for `settings` with the blend `strengths`: [(PIL image, ImageParams)], image i with seed+i."""
        settings.check()
        base = self.base
        width = settings.width or base.native_resolution
        height = settings.height or base.native_resolution
        with self.lock:
            self.blender.set_strengths(strengths)
            loras = [LoraRef(r.file.name, te, u, r.file.short_hash) for r, te, u in self.blender.active()]
            pipe = base.pipeline(scheduler=make_scheduler(settings.scheduler, base.scheduler_config))
            pipe.set_progress_bar_config(disable=not progress)
            out = []
            for i in range(settings.num_images):
                seed = settings.seed + i
                image = pipe(prompt=settings.prompt, negative_prompt=settings.negative or None,
                             num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                             width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed),
                             output_type="pil").images[0]
                params = ImageParams(prompt=settings.prompt, negative=settings.negative, steps=settings.steps,
                                     sampler=SCHEDULERS[settings.scheduler][2], cfg=settings.guidance, seed=seed,
                                     width=width, height=height, model=base.name, loras=loras,
                                     extra={"Version": f"sdlora {_version()}"})
                out.append((image, params))
            return out


def _version() -> str:
    import sdlora

    return sdlora.__version__


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_lora_spec(spec: str) -> tuple[str, float, float]:
    """`FILE`, `FILE:S` or `FILE:TE:UNET` (A1111's order) -> (file, text-encoder strength, unet strength)."""
    def num(text: str) -> float | None:
        try:
            v = float(text)
        except ValueError:
            return None
        return v if math.isfinite(v) else None

    if not spec:
        raise SdloraError("--lora needs a file: FILE[:STRENGTH] or FILE:TE_STRENGTH:UNET_STRENGTH")
    if Path(spec).is_file():
        return spec, 1.0, 1.0
    parts = spec.split(":")
    if len(parts) >= 3 and num(parts[-2]) is not None and num(parts[-1]) is not None:
        return ":".join(parts[:-2]), num(parts[-2]), num(parts[-1])
    if len(parts) >= 2 and num(parts[-1]) is not None:
        return ":".join(parts[:-1]), num(parts[-1]), num(parts[-1])
    head, _, last = spec.rpartition(":")
    if head and Path(head).suffix and not re.search(r"[\\/]", last):
        raise SdloraError(f"--lora {spec}: strength '{last}' is not a number; use FILE:0.8 "
                          "or FILE:TE_STRENGTH:UNET_STRENGTH")
    return spec, 1.0, 1.0


def parse_size(text: str) -> tuple[int, int]:
    """`512` or `512x768` (width x height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise SdloraError(f"--size {text}: use WIDTHxHEIGHT, e.g. 512x768, or one number for a square")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


def output_paths(out: str, seeds: list[int]) -> list[Path]:
    """`--out x.png`: that file (x-0.png, x-1.png, .. for several); `--out DIR`: DIR/NNNNN-SEED.png after the last."""
    p = Path(out)
    if p.suffix.lower() == ".png":
        return [p] if len(seeds) == 1 else [p.with_name(f"{p.stem}-{i}.png") for i in range(len(seeds))]
    start = len(list(p.glob("*.png"))) if p.is_dir() else 0
    return [p / f"{start + i:05d}-{s}.png" for i, s in enumerate(seeds)]


def add_generate_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"base model: hub id, diffusers folder, .safetensors checkpoint or 'tiny' (default: {DEFAULT_MODEL})")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="kohya LoRA file, repeatable; FILE:S applies strength S (default 1), "
                        "FILE:TE:UNET separate text-encoder and UNet strengths (A1111 order)")
    p.add_argument("--prompt", required=True, help="prompt (add the adapters' trigger words yourself)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default: 7)")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=tuple(SCHEDULERS),
                   help=f"sampler (default: {DEFAULT_SCHEDULER})")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT or one number (default: the model's native resolution)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default: 1)")
    p.add_argument("--out", default="output", help="a .png path, or a folder for NNNNN-SEED.png files (default: output)")


def cmd_generate(args) -> int:
    import sys

    specs = [parse_lora_spec(s) for s in args.lora]
    width, height = parse_size(args.size) if args.size else (None, None)
    settings = Settings(prompt=args.prompt, negative=args.negative, seed=args.seed, steps=args.steps,
                        guidance=args.guidance, scheduler=args.scheduler, width=width, height=height,
                        num_images=args.num_images)
    settings.check()
    files = [load_adapter(path) for path, _, _ in specs]  # every file is checked before the model loads
    session = Session(args.model)
    strengths = {}
    for f, (_, te, unet) in zip(files, specs):
        r = session.blender.add(f)
        if r.unmatched:
            print(f"sdlora: warning: {f.path.name}: {len(r.unmatched)} of {len(f.modules) + len(f.stray)} modules "
                  f"match nothing in the model and are ignored (first: {r.unmatched[0]})", file=sys.stderr)
        strengths[f.name] = (te, unet)
    results = session.generate(settings, strengths, progress=True)
    for path, (image, params) in zip(output_paths(args.out, [p.seed for _, p in results]), results):
        save_png(image, path, format_parameters(params))
        print(path)
    return 0
