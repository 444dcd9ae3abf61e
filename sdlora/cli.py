"""`sdlora` command line. Flags are generated from the config dataclasses; errors print as one line."""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from dataclasses import MISSING, fields

from sdlora.errors import SdloraError


def _flag_type(f):
    t = (f.type if not isinstance(f.type, str)
         else eval(f.type, vars(typing) | {"float": float, "int": int, "str": str, "bool": bool}))
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


# --help groups of `sdlora train`, in order; a field may also name its group in its metadata ("group").
TRAIN_GROUPS = {
    "data": ("images", "prompt", "trigger", "caption_dropout", "shuffle_tags", "keep_tags", "resolution",
             "force_resolution", "buckets", "no_flip", "repeats", "skip_bad_images", "cache_dir", "no_cache", "masks",
             "alpha_mask"),
    "model": ("model", "prediction_type", "mixed_precision", "base_precision", "te_precision",
              "gradient_checkpointing", "no_gradient_checkpointing", "compile", "compile_backend", "attention",
              "channels_last"),
    "LoRA": ("preset", "rank", "alpha", "no_text_encoder", "network", "dora", "conv_rank", "conv_alpha", "lokr_factor",
             "init_lora", "pivotal", "pivotal_init", "pivotal_lr", "pivotal_steps"),
    "training": ("steps", "epochs", "batch_size", "grad_accum", "lr", "te_lr", "lr_scheduler", "warmup_steps",
                 "optimizer", "optimizer_args", "weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset",
                 "seed", "ema", "ema_update_every"),
    "prior preservation": ("class_prompt", "class_images", "num_class_images", "prior_loss_weight"),
    "output": ("output_dir", "name", "out", "overwrite", "save_precision"),
    "checkpoints": ("save_every", "keep_last", "resume"),
    "monitoring": ("no_eval_loss", "sample_every", "sample_prompts", "sample_steps", "tensorboard", "validation_split",
                   "validation_images", "validate_every"),
}
OTHER_GROUP = "other options"
METAVARS = {"images": "DIR", "prompt": "TEXT", "trigger": "TEXT", "class_prompt": "TEXT", "class_images": "DIR",
            "cache_dir": "DIR", "output_dir": "DIR", "name": "NAME", "out": "FILE", "resume": "DIR|latest",
            "sample_prompts": "'P1;P2;..'", "model": "MODEL"}


def _with_default(help_: str, default) -> str:
    """`help (default: X)`, once: a help text that already says its default is left alone, and one that ends in
    a parenthesis gets the default inside it ("(ignored when --epochs is set; default: 500)")."""
    if re.search(r"default:|by default", help_):
        return help_
    if help_.endswith(")"):
        return f"{help_[:-1]}; default: {default})"
    return f"{help_} (default: {default})"


def add_dataclass_args(parser: argparse.ArgumentParser, cls, groups: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field: `--field-name`; bools are switches. Defaults are suppressed so that only flags the
    user typed override a --config file. With `groups` (title -> field names), the flags are listed under those
    titles in --help; fields with no group go under "other options". Required fields are marked."""
    where = {n: g for g, names in (groups or {}).items() for n in names}
    sections: dict[str, argparse._ArgumentGroup] = {}

    def section(title: str):
        if groups is None:
            return parser
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        return sections[title]

    for title in groups or {}:
        section(title)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = _flag_type(f)
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata.get("help", "")
        if f.default is MISSING and f.default_factory is MISSING:
            help_ = f"required (here or in --config): {help_}"
        elif default is not None and t is not bool:
            help_ = _with_default(help_, default)
        g = section(f.metadata.get("group") or where.get(f.name, OTHER_GROUP))
        if t is bool:
            g.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_)
        else:
            choices = f.metadata.get("choices")
            g.add_argument(flag, type=t, default=argparse.SUPPRESS, help=help_, choices=choices,
                           metavar=None if choices else f.metadata.get("metavar") or METAVARS.get(f.name)
                           or ("N" if t is int else f.name.upper()))


# train's flags for the separate parts of FLUX.1 / SD 3.5 single files and T5's length (and the frozen model's
# storage precisions), given to `generate` and `merge` from the same TrainConfig fields: same names, types and help
PART_FLAGS = ("clip_l", "clip_g", "t5xxl", "ae", "t5xxl_max_token_length")
PRECISION_FLAGS = ("base_precision", "te_precision")


def add_part_args(parser: argparse.ArgumentParser, precision: bool = False) -> None:
    """--clip-l, --clip-g, --t5xxl, --ae, --t5xxl-max-token-length (and --base-precision, --te-precision) as
    `sdlora train` has them, in a "model parts" group."""
    from dataclasses import field, make_dataclass

    from sdlora.config import TrainConfig

    names = PART_FLAGS + (PRECISION_FLAGS if precision else ())
    parts = make_dataclass("Parts", [(f.name, f.type, field(default=f.default, metadata=dict(f.metadata) | {
        "group": "model parts (FLUX.1 / SD 3.5 single files)"})) for f in fields(TrainConfig) if f.name in names])
    add_dataclass_args(parser, parts)


def part_values(args: argparse.Namespace) -> dict:
    """The part flags given (the others None), checked as `sdlora train` checks them (one-line SdloraError)."""
    values = {n: getattr(args, n, None) for n in PART_FLAGS + PRECISION_FLAGS}
    n = values["t5xxl_max_token_length"]
    if n is not None and not 1 <= n <= 512:
        raise SdloraError(f"--t5xxl-max-token-length must be between 1 and 512, got {n}")
    return values


def load_model(model: str, values: dict):
    """`model` loaded as `sdlora train` loads it (sdlora.models.load_base; SD3/FLUX files and folders piece by piece,
    sdlora/bigload.py) with the part flags `values` (`part_values`); frozen weights at their precisions, computing in
    fp32. A precision this torch / bitsandbytes cannot run is refused before the model loads."""
    from types import SimpleNamespace

    from sdlora import quant
    from sdlora.bigload import load_options
    from sdlora.models import load_base

    for name in PRECISION_FLAGS:
        if values[name]:
            quant.check_mode(values[name], "cpu", "--" + name.replace("_", "-"))
    precision = quant.Precision(values["base_precision"], values["te_precision"], trained_te=lambda spec: set())
    return load_base(model, precision=precision, options=load_options(SimpleNamespace(mixed_precision="no", **values)))


def _cmd_train(args: argparse.Namespace) -> int:
    from sdlora.config import load_toml, make_config

    values = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "func")})
    cfg = make_config(values)
    from pathlib import Path

    if not Path(cfg.images).is_dir():  # a typo in the path is reported before torch loads (the loop checks the rest)
        raise SdloraError(f"{cfg.images}: no such folder; pass a folder of training images (--images)")
    from sdlora.train.loop import train

    train(cfg)  # Ctrl-C: the loop says what it saved, then main() exits 130
    return 0


# name -> (module, help, description). Each module has add_<name>_args(parser) and cmd_<name>(args) -> exit code;
# `main` imports only the module of the command given (most import torch), so `sdlora --help` and `sdlora train`'s
# option errors come in a fraction of a second.
SUBCOMMANDS = {
    "generate": ("sdlora.infer.cli", "generate images with LoRA adapters blended into a base model",
                 "Generate PNGs (with A1111 'parameters') from a base model and kohya LoRA files."),
    "verify": ("sdlora.cli_formats", "check a LoRA file loads fully in kohya, diffusers, ComfyUI and A1111",
               "Check names, shapes, NaN/Inf, empty delta and alpha; print which tools list the file. "
               "Exits 1 on any problem."),
    "inspect": ("sdlora.inspect_lora", "show a LoRA file's architecture, targets, rank/alpha, trigger and metadata",
                "Describe a LoRA file from kohya, OneTrainer, ai-toolkit, diffusers or PEFT."),
    "convert": ("sdlora.cli_formats", "convert a LoRA between kohya, diffusers and PEFT layouts",
                "Convert a LoRA file; alpha is carried through; prints converted/skipped/unknown."),
    "merge": ("sdlora.merge", "bake LoRAs into a base model (single-file LDM checkpoint or diffusers folder)",
              "Fuse LoRA adapters at given strengths into a model and save it."),
    "resize": ("sdlora.resize", "reduce a LoRA's rank by SVD",
               "Lower the rank of every module by truncated SVD; prints the energy kept."),
    "scan": ("sdlora.data.scan_command", "show what training would see in an image folder, without loading a model",
             "List concepts (kohya N_words folders) and repeats, every image with its size, bucket and caption (with "
             "its CLIP token count and what 77 tokens cut off), and the problems training would warn about or stop "
             "on. Exits 1 when training would stop."),
    "caption": ("sdlora.caption.command", "write a caption file beside each image of a folder (toy, BLIP, Florence-2, "
                "WD14)", "Caption the images of a folder that have no caption yet (--overwrite: all of them), "
                "with --prefix first and at most --max-tokens CLIP tokens; one .txt per image, written atomically."),
    "plan": ("sdlora.plan", "the settings that fit a run in a GPU's memory, with their byte counts (no weights loaded)",
             "Choose base and text-encoder precision, block swap and gradient checkpointing for --vram GB and print "
             "the bytes of weights, LoRA + optimizer state and activations (counted on the meta device)."),
    "eval": ("sdlora.eval.command", "score an adapter: toy-world judge, or CLIP-I/CLIP-T/DINO on real models",
             "Generate with and without the adapter and score the images (subject fidelity, prompt fidelity)."),
}


def _add_subcommand(sub, name: str, full: bool = True) -> None:
    """`full`: with its options (imports its module); otherwise only its name and help line, for `sdlora --help`
    and for commands other than the one being run."""
    import importlib

    module, help_, description = SUBCOMMANDS[name]
    p = sub.add_parser(name, help=help_, description=description)
    if full:
        mod = importlib.import_module(module)
        getattr(mod, f"add_{name}_args")(p)
        p.set_defaults(func=getattr(mod, f"cmd_{name}"))


def _cmd_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdlora.cache import cache_entries, clear_entries, default_cache_dir

    folder = Path(args.dir) if args.dir else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise SdloraError(f"{'--dir' if args.dir else '$SDLORA_CACHE'} {folder} is not a folder; pass the cache folder")
    files = cache_entries(folder)
    size = sum(p.stat().st_size for p in files)
    if args.clear:
        kept = clear_entries(folder, files)
        print(f"cleared {folder}: {len(files)} entries, {size / 2**20:.1f} MiB"
              + (f"; {kept} other file(s) there are not sdlora cache entries and were left alone" if kept else ""))
    else:
        print(f"{folder}: {len(files)} entries, {size / 2**20:.1f} MiB (latents and text embeddings; "
              "entries are keyed on content, so stale ones are never used)")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="show or clear the latent/text-embedding cache")
    p.add_argument("--clear", action="store_true",
                   help="delete every cache entry (only files sdlora wrote as cache entries; "
                        "nothing else in the folder)")
    p.add_argument("--dir", help="cache folder (default: ~/.cache/sdlora or $SDLORA_CACHE)")
    p.set_defaults(func=_cmd_cache)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole `sdlora` parser; with `command`, only that subcommand gets its options (the others, whose modules
    import torch, are listed by name)."""
    from sdlora.config import TrainConfig

    parser = argparse.ArgumentParser(prog="sdlora",
                                     description="Stable Diffusion LoRA trainer with kohya-format output.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="DreamBooth-LoRA training from a folder of images",
                       usage="sdlora train --images DIR --prompt TEXT [options]",
                       description="Train a LoRA on a folder of images; writes a kohya-format .safetensors. "
                                   "--images is required (on the command line or in --config), and --prompt unless "
                                   "--images holds kohya-style N_words concept folders.",
                       epilog="Example (offline, about a minute on a CPU): sdlora train --model toy --images "
                              "datasets/toy-purple-triangle --prompt 'a sks triangle' --steps 600 --lr 1e-3")
    p.add_argument("--config", metavar="FILE", help="TOML file with any of the settings below (keys as the flags "
                   "without '--'); flags given on the command line override it")
    add_dataclass_args(p, TrainConfig, TRAIN_GROUPS)
    p.set_defaults(func=_cmd_train)
    for name in SUBCOMMANDS:
        _add_subcommand(sub, name, full=command in (None, name))
    _add_cache(sub)
    return parser


def quiet_libraries() -> None:
    """Library chatter (deprecations, optional backends) is not the user's problem; errors still show."""
    import logging
    import os
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "failed to load CPU kernels" when it is installed
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-file "Loading weights" bars; ours stay
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    try:
        quiet_libraries()
        given = sys.argv[1:] if argv is None else argv
        command = next((a for a in given if not a.startswith("-")), "")  # the top level has no options but -h
        parser = build_parser(command)  # the module of `command` only: most import torch
        args = parser.parse_args(argv)
        return args.func(args)
    except SdloraError as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # training says what it saved before this; anywhere else nothing was written (outputs are atomic)
        print("sdlora: interrupted", file=sys.stderr)
        return 130
