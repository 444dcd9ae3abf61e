"""`sdlora generate`: images from a base model with LoRA adapters blended in, saved as PNGs with A1111 parameters."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from sdlora import archs, bounds
from sdlora.cli import add_part_args, load_model, part_values
from sdlora.errors import SdloraError
from sdlora.formats import file_io
from sdlora.formats.a1111 import format_parameters
from sdlora.formats.read import read_adapter
from sdlora.infer.session import Session, refuse_misfits, sampler_for
from sdlora.infer.settings import SCHEDULERS, Settings, add_flags
from sdlora.models import DEFAULT_MODEL, model_kinds_help


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
    if Path(spec).exists():  # a file or a PEFT folder, even with ':' in its name
        return spec, 1.0, 1.0
    parts = spec.split(":")
    if len(parts) >= 3 and num(parts[-2]) is not None and num(parts[-1]) is not None:
        return ":".join(parts[:-2]), bounds.strength(num(parts[-2]), spec), bounds.strength(num(parts[-1]), spec)
    if len(parts) >= 2 and num(parts[-1]) is not None:
        return ":".join(parts[:-1]), bounds.strength(num(parts[-1]), spec), num(parts[-1])
    head, _, last = spec.rpartition(":")
    if head and Path(head).suffix and not re.search(r"[\\/]", last):
        raise SdloraError(f"--lora {spec}: strength '{last}' is not a number; use FILE:0.8 "
                          "or FILE:TE_STRENGTH:UNET_STRENGTH")
    return spec, 1.0, 1.0


def named_paths(out: str, n: int) -> list[Path] | None:
    """`--out x.png`: that file (x-0.png, x-1.png, .. for several); None for `--out DIR` (names are reserved when
    each image is saved: `reserve_path`)."""
    p = Path(out)
    if p.suffix.lower() != ".png":
        return None
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}.png") for i in range(n)]


def check_outputs(out: str, n: int, overwrite: bool = False, inputs: dict | None = None) -> None:
    """Before the model loads: a .png path (or each of its numbered forms) must not replace a file unless
    --overwrite; a folder must be a folder and writable (sdlora.guard)."""
    from sdlora import guard

    p = Path(out)
    if p.suffix and p.suffix.lower() != ".png" and not p.is_dir():
        raise SdloraError(f"--out {out}: pass a .png path or a folder for the images")
    for path in named_paths(out, n) or []:
        guard.check_file(path, inputs=inputs, overwrite=overwrite, suffixes=(".png",))
    if named_paths(out, n) is None:
        if p.exists() and not p.is_dir():
            raise SdloraError(f"--out {out} exists and is not a folder; pass a .png path or a folder")
        guard.probe_writable(p, "--out")


_NUMBERED = re.compile(r"^(\d{5,})-")


def reserve_path(out: str, seed: int) -> Path:
    """`--out DIR`: DIR/NNNNN-SEED.png, NNNNN one past the highest number there, taken atomically (two runs into
    one folder, or a deleted file, never make a name collide with an existing image)."""
    from sdlora import guard

    folder = Path(out)
    taken = [int(m.group(1)) for f in (folder.iterdir() if folder.is_dir() else []) if (m := _NUMBERED.match(f.name))]
    return guard.reserve(folder, lambda i: f"{i:05d}-{seed}.png", start=max(taken, default=-1) + 1)


def save_images(out: str, results, text_of, overwrite: bool = False) -> list[Path]:
    """Write each (image, params) of `results` as a PNG with its parameters; returns the paths."""
    paths = named_paths(out, len(results))
    written = []
    for i, (image, params) in enumerate(results):
        path = paths[i] if paths else reserve_path(out, params.seed)
        try:
            file_io.save_png(image, path, {"parameters": text_of(params)})
        except BaseException:
            if not paths:
                path.unlink(missing_ok=True)  # the empty reserved name
            raise
        written.append(path)
    return written


def add_generate_args(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_kinds_help())
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="kohya LoRA file, repeatable; FILE:S applies strength S (default 1), "
                        "FILE:TE:UNET separate text-encoder and UNet strengths (A1111 order)")
    add_flags(p)  # the settings of the images: prompt, seed, steps, guidance, sampler, size, count
    p.add_argument("--out", default="output", metavar="PATH",
                   help="a .png path, or a folder for NNNNN-SEED.png files (default: output)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out .png file(s) if they exist")
    add_part_args(p, precision=True)


def _num(x: float) -> str:
    return f"{x:g}"


def cmd_generate(args) -> int:
    def say(msg: str) -> None:  # what it loads and does, on stderr: stdout is the list of written files
        print(msg, file=sys.stderr, flush=True)

    specs = [parse_lora_spec(s) for s in args.lora]
    settings = Settings.from_flags(args)
    check_outputs(args.out, settings.num_images, args.overwrite,
                  {"--model": args.model, "--lora": [p for p, _, _ in specs]})
    files = [read_adapter(path) for path, _, _ in specs]  # every file is checked before the model loads
    refuse_misfits(files, args.model)  # and its family (or built-in model) too
    parts = part_values(args)
    say(f"loading model {args.model}")
    session = Session(args.model, base=load_model(args.model, parts))
    base = session.base
    say(f"model {args.model}: {archs.label(base.arch)}, {base.prediction_type}, "
        f"native size {base.native_resolution} px")
    if args.guidance is None:
        settings.guidance = base.spec.sample_guidance
    strengths = {}
    for f, (_, te, unet) in zip(files, specs):
        r = session.blender.add(f)
        if r.unmatched:
            say(f"sdlora: warning: {f.path.name}: {len(r.unmatched)} of {len(f.modules) + len(f.unknown)} modules "
                f"match nothing in the model and are ignored (first: {r.unmatched[0]})")
        strengths[f.name] = (te, unet)
        s = _num(te) if te == unet else f"{_num(te)} on the text encoder, {_num(unet)} on the UNet"
        trigger = f", trigger '{f.trigger}'" if f.trigger else ""
        say(f"adapter {f.path.name} as <lora:{f.name}>: strength {s}, {len(r.targets)} modules{trigger}")
    if not files:
        say("no adapters: the base model alone")
    w, h = settings.width or base.native_resolution, settings.height or base.native_resolution
    n = settings.num_images
    seeds = f"seed {settings.seed}" if n == 1 else f"seeds {settings.seed}-{settings.seed + n - 1}"
    say(f"generating {n} image{'s' if n > 1 else ''} of {w}x{h} px: {settings.steps} steps, "
        f"{SCHEDULERS[sampler_for(base.spec, settings.scheduler)][2]}, CFG {_num(settings.guidance)}, {seeds}")
    results = session.generate(settings, strengths, progress=True)
    for path in save_images(args.out, results, format_parameters, args.overwrite):
        print(path)
    return 0
