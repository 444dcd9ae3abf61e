"""The command lines of `sdlora verify` and `sdlora convert`; what they do is in `formats/verify.py` and
`formats/convert.py`, pure functions with no argparse."""

from __future__ import annotations

import json

from sdlora import archs
from sdlora.formats import convert, verify
from sdlora.models import model_kinds_help


def add_verify_args(p) -> None:
    p.add_argument("file", help="LoRA .safetensors (kohya, diffusers, PEFT) or PEFT folder")
    p.add_argument("--model", default=None, help="check against this loaded model instead of the architecture "
                   "built from public configs; " + model_kinds_help(None))
    p.add_argument("--arch", choices=archs.IDS, default=None, help="architecture to check against (default: "
                   "from the metadata and key names)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_verify(args) -> int:
    model = None
    if args.model:
        from sdlora.models import load_base

        model = load_base(args.model)
    rep = verify.verify_file(args.file, arch=args.arch, model=model)
    if args.json:
        print(json.dumps({"ok": rep.ok, "arch": rep.arch, "modules": rep.modules, "keys": rep.keys,
                          "problems": rep.problems, "notes": rep.notes, "tools": rep.tools}, indent=2))
    else:
        print("\n".join(rep.lines()))
    return 0 if rep.ok else 1


def add_convert_args(p) -> None:
    p.add_argument("input", help="LoRA file (.safetensors: kohya, diffusers or PEFT) or a PEFT folder")
    p.add_argument("output", help="output .safetensors (kohya, diffusers) or folder (peft)")
    p.add_argument("--to", required=True, choices=convert.FORMATS, help="output format")
    p.add_argument("--arch", choices=archs.IDS, default=None, help="architecture (default: from metadata and names)")
    p.add_argument("--alpha-if-missing", type=float, default=None, metavar="ALPHA",
                   help="write this alpha for modules that have none (default: keep them as they are)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or what sdlora wrote in an existing output folder")


def cmd_convert(args) -> int:
    rep = convert.convert(args.input, args.output, args.to, args.arch, args.alpha_if_missing, args.overwrite)
    print(rep.line())
    for n in rep.notes:
        print(f"note: {n}")
    print(args.output)
    return 0
