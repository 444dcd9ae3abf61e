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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SdloraError as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
