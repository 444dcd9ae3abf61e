"""`sdlora` command line. Flags are generated from the config dataclasses; errors print as one line."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields

from sdlora.errors import SdloraError


def _flag_type(f):
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing) | {"float": float, "int": int, "str": str, "bool": bool})
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field: `--field-name`; bools are switches. Defaults are suppressed so that only flags the
    user typed override a --config file."""
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = _flag_type(f)
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata.get("help", "")
        if default is not None and t is not bool:
            help_ += f" (default: {default})"
        if t is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(flag, type=t, default=argparse.SUPPRESS, help=help_,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else f.name.upper())


def _cmd_train(args: argparse.Namespace) -> int:
    from sdlora.config import load_toml, make_config

    values = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "func")})
    cfg = make_config(values)
    from sdlora.train.loop import train

    try:
        train(cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _add_generate(sub) -> None:
    from sdlora.infer import add_generate_args, cmd_generate

    p = sub.add_parser("generate", help="generate images with LoRA adapters blended into a base model",
                       description="Generate PNGs (with A1111 'parameters') from a base model and kohya LoRA files.")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    from sdlora.toy.evaluate import add_eval_args, cmd_eval

    p = sub.add_parser("eval", help="score an adapter on the toy model: subject fidelity and prompt fidelity",
                       description="Generate with and without the adapter on the toy base and judge the images.")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)


def _add_verify(sub) -> None:
    from sdlora.formats.verify import add_verify_args, cmd_verify

    p = sub.add_parser("verify", help="check a LoRA file loads fully in kohya, diffusers, ComfyUI and A1111",
                       description="Check names, shapes, NaN/Inf, empty delta and alpha; print which tools list the "
                                   "file. Exits 1 on any problem.")
    add_verify_args(p)
    p.set_defaults(func=cmd_verify)


def _add_inspect(sub) -> None:
    from sdlora.inspect import add_inspect_args, cmd_inspect

    p = sub.add_parser("inspect", help="show a LoRA file's architecture, targets, rank/alpha, trigger and metadata",
                       description="Describe a LoRA file from kohya, OneTrainer, ai-toolkit, diffusers or PEFT.")
    add_inspect_args(p)
    p.set_defaults(func=cmd_inspect)


def _add_convert(sub) -> None:
    from sdlora.formats.convert import add_convert_args, cmd_convert

    p = sub.add_parser("convert", help="convert a LoRA between kohya, diffusers and PEFT layouts",
                       description="Convert a LoRA file; alpha is carried through; prints converted/skipped/unknown.")
    add_convert_args(p)
    p.set_defaults(func=cmd_convert)


def _add_merge(sub) -> None:
    from sdlora.merge import add_merge_args, cmd_merge

    p = sub.add_parser("merge", help="bake LoRAs into a base model (single-file LDM checkpoint or diffusers folder)",
                       description="Fuse LoRA adapters at given strengths into a model and save it.")
    add_merge_args(p)
    p.set_defaults(func=cmd_merge)


def _add_resize(sub) -> None:
    from sdlora.resize import add_resize_args, cmd_resize

    p = sub.add_parser("resize", help="reduce a LoRA's rank by SVD",
                       description="Lower the rank of every module by truncated SVD; prints the energy kept.")
    add_resize_args(p)
    p.set_defaults(func=cmd_resize)


def _cmd_cache(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from sdlora.cache import default_cache_dir

    folder = Path(args.dir) if args.dir else default_cache_dir()
    files = [p for p in folder.rglob("*.safetensors")] if folder.is_dir() else []
    size = sum(p.stat().st_size for p in files)
    if args.clear:
        if folder.is_dir():
            shutil.rmtree(folder)
        print(f"cleared {folder}: {len(files)} entries, {size / 2**20:.1f} MiB")
    else:
        print(f"{folder}: {len(files)} entries, {size / 2**20:.1f} MiB (latents and text embeddings; "
              "entries are keyed on content, so stale ones are never used)")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the latent/text-embedding cache")
    p.add_argument("--clear", action="store_true", help="delete every cache entry")
    p.add_argument("--dir", help="cache folder (default: ~/.cache/sdlora or $SDLORA_CACHE)")
    p.set_defaults(func=_cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    from sdlora.config import TrainConfig

    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer with kohya-format output.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="DreamBooth-LoRA training from a folder of images",
                       description="Train a LoRA on a folder of images; writes a kohya-format .safetensors.")
    p.add_argument("--config", help="TOML file with any of the settings below; flags override it")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_cmd_train)
    _add_generate(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_convert(sub)
    _add_merge(sub)
    _add_resize(sub)
    _add_cache(sub)
    _add_eval(sub)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (deprecations, optional backends) is not the user's problem; errors still show."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SdloraError as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
