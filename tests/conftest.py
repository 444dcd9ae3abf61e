"""Shared fixtures and helpers: the built-in tiny model, small image folders, kohya-layout state dicts, and a
trained adapter. Test modules import helpers from here (`from tests.conftest import ...`), never from each other."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config import make_config
from sdlora.train.loop import train

# One torch thread everywhere: the test machines have 2 shared cores, the tiny models' ops are too small to split, and
# two contended OpenMP threads spin-wait for each other (a 6 s run took 59 s with 2 threads). Set here, at import,
# for this process, and through OMP_NUM_THREADS for every `sdlora` subprocess the tests start (they inherit it).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "datasets" / "dog"


def quiet(*_a, **_k):
    pass


def train_tiny(out: Path, images: Path = DOG, **overrides):
    """Train on the tiny model in-process; returns the TrainResult. Tests train into one path again and again, so
    `overwrite` is on unless a test says otherwise (the output policy's own tests do)."""
    values = dict(images=str(images), prompt="sks dog", model="tiny", steps=4, lr=1e-3, out=str(out), seed=0,
                  overwrite=True)
    values.update(overrides)
    return train(make_config(values), log=quiet)


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
            down, up = torch.randn(rank, m.shape[1], *m.shape[2:], generator=g), torch.randn(m.shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, m.shape[1], generator=g), torch.randn(m.shape[0], rank, generator=g)
        sd[f"{k}.lora_down.weight"] = (down * 0.1).to(dtype)
        sd[f"{k}.lora_up.weight"] = (up * 0.1).to(dtype)
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Latent/text caches of this test session live in a temp folder (inherited by subprocesses): tests never
    reuse a cache from an earlier run or touch the user's ~/.cache/sdlora."""
    import os

    old = os.environ.get("SDLORA_CACHE")
    os.environ["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("sdlora-cache"))
    yield
    if old is None:
        os.environ.pop("SDLORA_CACHE", None)
    else:
        os.environ["SDLORA_CACHE"] = old


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One adapter trained for a few steps with alpha != rank, shared by read-only tests."""
    out = tmp_path_factory.mktemp("trained") / "dog.safetensors"
    return train_tiny(out, steps=6, rank=4, alpha=2)


@pytest.fixture
def odd_dir(tmp_path) -> Path:
    """A folder whose name has spaces and non-ASCII characters, as users' folders do."""
    d = tmp_path / "my photos ü é 写真"
    d.mkdir()
    return d


@pytest.fixture
def dog_copy(odd_dir) -> Path:
    d = odd_dir / "dog pics"
    shutil.copytree(DOG, d)
    return d
