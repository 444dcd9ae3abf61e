"""Bounds on everything that sizes work or memory (issue 18, part 3): repeats (flag and kohya folder name), images ×
repeats × epochs, steps, generate's size and image count, adapter strength (one rule in generate, merge and the
app), caption length, and files in image folders that are not regular files (a FIFO named `x.jpg`).

Each refusal is one `sdlora: error:` line, given in under a second and before any model loads (loading one here
fails the test); nothing is written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora import bounds
from sdlora.cli import main
from sdlora.config import make_config
from sdlora.errors import SdloraError
from sdlora.formats import file_io, kohya, layouts
from sdlora.formats.read import read_adapter
from sdlora.infer.blend import Blender
from sdlora.models import load_base
from sdlora.train.loop import train
from tests.helpers import DOG, ROOT, kohya_fixture, make_images

torch.set_num_threads(1)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a base model fails the test: the refusal must come before it."""
    def boom(*_a, **_k):
        raise AssertionError("a base model was loaded before the refusal")

    for where in ("sdlora.train.prepare", "sdlora.infer.session", "sdlora.merge"):
        monkeypatch.setattr(f"{where}.load_base", boom)


def refused_fast(capsys, args) -> str:
    """`sdlora ARGS` exits 2 with one `sdlora: error:` line, no traceback, within a second."""
    t0 = time.perf_counter()
    code = main([str(a) for a in args])
    took = time.perf_counter() - t0
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("sdlora: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in cap.err + cap.out, cap.err
    assert took < 1.0, f"refused after {took:.2f}s"
    return lines[0]


def kohya_parent(tmp_path: Path, folder: str, n: int = 3) -> Path:
    parent = tmp_path / "data"
    make_images(parent / folder, n)
    return parent


def _train(images, out, *extra):
    return ["train", "--images", images, "--model", "tiny", "--out", out, *extra]


# (what, how to build the images folder, extra flags, needle)
TRAIN_CASES = [
    ("--repeats flag", lambda t: make_images(t / "imgs"), ["--prompt", "p", "--repeats", "1000000000000"],
     "--repeats 1000000000000 is more than the limit of 10,000"),
    ("folder 10^12 repeats", lambda t: kohya_parent(t, "1000000000000_x"), [],
     "1,000,000,000,000 repeats (the folder name's N) is more than the limit of 10,000; rename it, e.g. '10_x'"),
    ("folder 99999999 repeats", lambda t: kohya_parent(t, "99999999_x"), [],
     "99,999,999 repeats (the folder name's N) is more than the limit"),
    ("images × repeats", lambda t: kohya_parent(t, "10000_x"), ["--repeats", "100"],
     "one epoch is 3,000,000 images (files × folder repeats × --repeats 100), more than the limit of 1,000,000"),
    ("epochs × images × repeats", lambda t: kohya_parent(t, "10000_x"), ["--epochs", "1000"],
     "--epochs 1000 is 30,000,000 steps (30,000 batches per epoch), more than the limit of 1,000,000"),
    ("--steps", lambda t: make_images(t / "imgs"), ["--prompt", "p", "--steps", "10000000"],
     "--steps 10000000 is more than the limit of 1,000,000"),
    ("--epochs", lambda t: make_images(t / "imgs"), ["--prompt", "p", "--epochs", "1000000"],
     "--epochs 1000000 is more than the limit of 100,000"),
    ("--sample-steps", lambda t: make_images(t / "imgs"), ["--prompt", "p", "--sample-steps", "5000"],
     "--sample-steps 5000 is more than the limit of 1,000"),
    ("--num-class-images", lambda t: make_images(t / "imgs"),
     ["--prompt", "p", "--class-prompt", "a dog", "--num-class-images", "10000000"],
     "--num-class-images 10000000 is more than the limit of 100,000"),
]


@pytest.mark.parametrize("what,make,extra,needle", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bounds_are_refused_at_once(capsys, tmp_path, no_model_loads, what, make, extra, needle):
    images = make(tmp_path)
    line = refused_fast(capsys, _train(images, tmp_path / "out" / "a.safetensors", *extra))
    assert needle in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder,repeats,needle", [
    ("99999999_x", 1, "99,999,999 repeats (the folder name's N) is more than the limit"),
    ("1000000000000_x", 1, "1,000,000,000,000 repeats"),
    ("5000_x", 100, "one epoch is 1,500,000 images"),
])
def test_scan_reports_repeats_past_the_limit(capsys, tmp_path, folder, repeats, needle):
    parent = kohya_parent(tmp_path, folder)
    t0 = time.perf_counter()
    code = main(["scan", str(parent), "--resolution", "64", "--repeats", str(repeats)])
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert code == 1 and took < 1.0, (code, took)
    assert needle in out and "training would stop: " in out and "problem(s):" in out, out


GENERATE_CASES = [
    (["--size", "100000"], "image size 100000x100000 is too large: each side at most 4096 px"),
    (["--size", "4096x4096"], "image size 4096x4096 is 16.8 MP, more than the 8.4 MP limit"),
    (["--steps", "100000"], "steps 100000 is more than the limit of 1,000"),
    (["--num-images", "100000"], "the number of images 100000 is more than the limit of 1,000"),
    (["--lora", "F.safetensors:1e30"], "strength 1e+30 of F.safetensors:1e30 is out of range: use a number between"),
    (["--lora", "F.safetensors:1:-11"], "strength -11 of F.safetensors:1:-11 is out of range"),
]


@pytest.mark.parametrize("extra,needle", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_bounds_are_refused_at_once(capsys, tmp_path, no_model_loads, extra, needle):
    line = refused_fast(capsys, ["generate", "--model", "tiny", "--prompt", "p", "--out", tmp_path / "o", *extra])
    assert needle in line, line
    assert not (tmp_path / "o").exists()


def test_merge_refuses_the_same_strength_generate_refuses(capsys, tmp_path, no_model_loads):
    line = refused_fast(capsys, ["merge", "--model", "tiny", "--lora", "F.safetensors:1e30",
                                 "--out", tmp_path / "m.safetensors"])
    assert "strength 1e+30 of F.safetensors:1e30 is out of range" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_the_app_blend_refuses_the_same_strengths(tmp_path):
    """app.py sets strengths through Blender.set_strengths, as generate and merge do: the same rule, one place."""
    base = load_base("tiny")
    table = layouts.table_of(base.components, base.arch)
    kohya.save(kohya_fixture(table, r"^lora_unet_down_blocks_0"), tmp_path / "a.safetensors",
                    {"ss_base_model_version": "sd_v1"})
    blender = Blender(base)
    f = read_adapter(tmp_path / "a.safetensors")
    blender.add(f)
    before = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    for bad in (1e30, float("inf"), float("nan"), -10.5):
        with pytest.raises(SdloraError, match=r"out of range: use a number between -10 and 10"):
            blender.set_strengths({f.name: bad})
    assert all(torch.equal(v, before[k]) for k, v in base.denoiser.state_dict().items())
    blender.set_strengths({f.name: bounds.MAX_STRENGTH})  # the limit itself is allowed


def test_a_fifo_named_like_an_image_is_skipped_by_name(tmp_path):
    """A FIFO `x.jpg` (and a FIFO caption) would block the reader forever: scan and train skip them, naming them."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    images = tmp_path / "dog"
    shutil.copytree(DOG, images)
    os.mkfifo(images / "x.jpg")
    os.mkfifo(images / "00.txt")  # a caption that is a FIFO: never opened
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "sdlora", "scan", str(images), "--prompt", "sks dog",
                        "--resolution", "64"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x.jpg: not a regular file (a FIFO, device or socket), skipped unread" in r.stdout
    assert "00.txt: not a regular file" in r.stdout
    lines = []
    train(make_config(dict(images=str(images), prompt="sks dog", model="tiny", steps=1,
                           out=str(tmp_path / "o.safetensors"), no_eval_loss=True)), log=lines.append)
    note = next(ln for ln in lines if ln.startswith("note: skipped"))
    assert "2 file(s) that are not regular files" in note and "x.jpg" in note and "00.txt" in note


def test_a_huge_caption_is_cut_and_the_token_limit_is_said(tmp_path):
    """A 1 MB caption: training warns that only the text encoder's first tokens are read; what is printed and what
    the file's metadata keeps of it is short."""
    images = make_images(tmp_path / "imgs", 2, size=(64, 64))
    (images / "img_0.txt").write_text("sks dog, " + "very " * 200_000 + "long")  # about 1 MB
    lines = []
    out = tmp_path / "o.safetensors"
    train(make_config(dict(images=str(images), prompt="sks dog", model="tiny", steps=1, out=str(out),
                           no_eval_loss=True)), log=lines.append)
    warn = next(ln for ln in lines if "caption(s) are longer than the text encoder reads" in ln)
    assert "1 caption(s)" in warn and "img_0.png" in warn and "CLIP the first 77" in warn, warn
    assert all(len(ln) < 2000 for ln in lines), max(map(len, lines))
    _, md = file_io.load(out)
    assert max(len(v) for v in md.values()) < 20_000, max(len(v) for v in md.values())
    assert load_file(out)  # the adapter was written
