"""Helpers shared by the test modules: paths, training the built-in tiny model, small image folders, kohya-layout
state dicts, `sdlora` run in-process or in a subprocess, and tensor comparisons. Test modules import them from here
(`from tests.helpers import ...`), never from each other; fixtures live in conftest.py. Nothing heavy is imported at
module level: the training loop is imported when a test first trains."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "datasets" / "dog"
CONFIGS = ROOT / "configs"
SDLORA = [sys.executable, "-m", "sdlora"]


def quiet(*_a, **_k):
    pass


def train_tiny(out: Path, images: Path = DOG, log=quiet, **overrides):
    """Train on the tiny model in-process (settings: sks dog, 4 steps, lr 1e-3, seed 0, unless overridden); returns
    the TrainResult. Tests train into one path again and again, so `overwrite` is on unless a test says otherwise
    (the output policy's own tests do)."""
    from sdlora.config import make_config
    from sdlora.train.loop import train

    values = dict(images=str(images), prompt="sks dog", model="tiny", steps=4, lr=1e-3, out=str(out), seed=0,
                  overwrite=True)
    values.update(overrides)
    return train(make_config(values), log=log)


def make_images(folder: Path, n: int = 3, size=(80, 64), seed: int = 0) -> Path:
    """A folder of n small random-colour PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
    return folder


def kohya_fixture(table: dict, pattern: str, rank: int = 2, alpha: float | None = 1.0, seed: int = 0,
                  dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A kohya-layout state dict for the modules of `table` (kohya name -> layouts.Module) whose names match
    `pattern`, written as kohya writes it: LoCon convs get a kxk down and a 1x1 up; no alpha keys when alpha is None."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, m in sorted(table.items()):
        if not re.search(pattern, k):
            continue
        if m.conv:
            down = torch.randn(rank, m.shape[1], *m.shape[2:], generator=g)
            up = torch.randn(m.shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, m.shape[1], generator=g), torch.randn(m.shape[0], rank, generator=g)
        sd[f"{k}.lora_down.weight"] = (down * 0.1).to(dtype)
        sd[f"{k}.lora_up.weight"] = (up * 0.1).to(dtype)
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


# ---------------------------------------------------------------- `sdlora` as a user runs it


def sub_env(cache: Path | None = None, **extra) -> dict:
    """The environment of an `sdlora` subprocess: UTF-8 output, unbuffered, one torch thread, this checkout first on
    the path, and its own latent/text cache when `cache` is given."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if cache is not None:
        env["SDLORA_CACHE"] = str(cache)
    return env | extra


def run_sdlora(*args, env: dict | None = None, cwd: Path = ROOT, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
    """`python -m sdlora ARGS` in a subprocess (text output captured)."""
    return subprocess.run([*SDLORA, *map(str, args)], capture_output=True, text=True, env=env or sub_env(), cwd=cwd,
                          timeout=timeout, **kw)


def error_line(code: int, err: str, out: str = "") -> str:
    """The one `sdlora: error:` line of a run that failed with exit code 2, without a traceback."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("sdlora: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out, err
    return lines[0]


def main_error(capsys, *args) -> str:
    """`sdlora ARGS` run in-process through sdlora.cli.main: its one error line (see error_line)."""
    from sdlora.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return error_line(code, cap.err, cap.out)


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """`sdlora ARGS` run in-process through sdlora.cli.main, with what it printed: the exit code, stdout and stderr
    as a subprocess would give them, without paying an interpreter start and the imports (seconds) per run."""
    from sdlora.cli import main

    capsys.readouterr()
    argv = [str(a) for a in args]
    code = main(argv)
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(["sdlora", *argv], code, cap.out, cap.err)


# ---------------------------------------------------------------- tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@torch.no_grad()
def randomize_trainable(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.Generator:
    """Add N(0, scale²) noise, drawn in parameter order from a generator seeded `seed`, to every trainable parameter
    of `module` (zero-initialised LoRA ups then compute something); returns the generator to draw inputs from."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return g


def wandb_history(run: Path) -> list[dict]:
    """The history rows ({key: value}; nested keys joined by "/") of an offline wandb run folder, read from its
    .wandb file: LevelDB-log records (32 KiB blocks of 7-byte-headed chunks after a 7-byte ":W&B" file header)
    holding wandb's `Record` protobufs. wandb has no public reader for offline runs."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run.glob("*.wandb")).read_bytes()
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            buf = b""
    return rows
