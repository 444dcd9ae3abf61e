"""Start-up: `sdlora --help`, option errors and a mistyped --images path are answered without importing torch or
diffusers (they take seconds to import; the answer must come in a fraction of one). Timing itself is measured by
`python -X importtime -m sdlora --help`, not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.subprocess  # a fresh interpreter: what `sdlora --help` imports

PROBE = ("import sys\nfrom sdlora.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
         "    code = e.code\nheavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') "
         "if m in sys.modules)\nprint('HEAVY=' + ','.join(heavy), file=sys.stderr)\nsys.exit(code)")


def probe(*args: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    heavy = next(line for line in p.stderr.splitlines() if line.startswith("HEAVY="))[len("HEAVY="):]
    return p.returncode, p.stdout + p.stderr, heavy


@pytest.mark.parametrize("args, code, needle", [
    (("--help",), 0, "generate images with LoRA adapters"),
    (("train", "--help"), 0, "--optimizer {adamw,adamw8bit,prodigy,adafactor,schedulefree}"),
    (("train", "--images", "no/such/dir", "--prompt", "x"), 2, "no/such/dir: no such folder"),
    (("train", "--images", "datasets/dog", "--prompt", "x", "--rank", "0"), 2, "--rank must be at least 1"),
    (("train", "--images", "datasets/dog", "--prompt", "x", "--optimizer", "prodigy", "--optimizer-args", "lr=1"),
     2, "prodigy takes no 'lr'"),
    (("train", "--config", "no/such.toml"), 2, "--config no/such.toml: no such file"),
])
def test_help_option_and_path_errors_do_not_import_torch(args, code, needle):
    rc, out, heavy = probe(*args)
    assert rc == code, out
    assert needle in " ".join(out.split()), out
    assert heavy == "", f"`sdlora {' '.join(args)}` imported {heavy}"


def test_the_command_given_still_gets_its_own_options():
    rc, out, _ = probe("verify", "--help")
    assert rc == 0 and "usage: sdlora verify" in out
