"""The training controls of issue 20 on the toy world: plain training vs masked loss, EMA, the best-validation
checkpoint (and LoRA+ where `--loraplus-ratio` exists), each over several seeds, scored by the toy judge as
`sdlora eval --subject "a purple triangle"` scores, plus the background leak. Prints a markdown table.

    python benchmarks/toy_controls.py                      # the table in README (4 rows from 2 runs x 3 seeds)
    python benchmarks/toy_controls.py --make-dataset datasets/toy-triangle-busy   # (re)render the data set

The data set (`datasets/toy-triangle-busy`, made by `make_dataset` with the toy world's renderer) is the purple
triangle on a *varying* background: two random colours in stripes of random width and direction, none of them a
world background (black, white, gray), with the triangle's own coverage as its mask (`masks/`), and 3 held-out
renders (`validation/`). A plain adapter learns the stripes with the triangle; a masked one (`--masks`) learns
from the triangle's pixels only.

Every run is the quick start's recipe (`--model toy --prompt "a sks triangle" --class-prompt "a triangle"
--num-class-images 40 --steps 600 --lr 1e-3`) on that data set, plus the run's flags and `--seed S`, trained by
the `sdlora train` CLI in a subprocess on one torch thread (OMP_NUM_THREADS, default 1), sharing one class-image
folder (as benchmarks/toy_kinds.py). Scores: subject fidelity, class leak and drift as `sdlora eval` prints them
(8 images per prompt), and the **background leak**: the share of "a sks triangle" images whose border is not a
plain world background (its pixels differ from the nearest of black/white/gray by more than BACKGROUND_TOLERANCE
on average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "toy-triangle-busy"
RECIPE = ["--model", "toy", "--prompt", "a sks triangle", "--class-prompt", "a triangle", "--num-class-images", "40",
          "--steps", "600", "--lr", "1e-3"]
SUBJECT, TRIGGER = "a purple triangle", "a sks triangle"
THREADS = os.environ.get("OMP_NUM_THREADS", "1")  # one torch thread per run (a shared CPU: less contention)
BACKGROUND_TOLERANCE = 0.1  # mean RGB distance (0..1 scale) of border pixels from the nearest world background

# run -> flags on top of the recipe. --ema and --validation-images change nothing of the raw adapter (the average and
# the validation forwards draw no training randomness), so one run gives three rows: its raw file, -ema and -best.
RUNS: dict[str, list[str]] = {
    "plain": ["--ema", "0.99", "--validation-images", str(DATA / "validation"), "--validate-every", "50"],
    "masked": ["--masks", str(DATA / "masks")],
    "loraplus": ["--loraplus-ratio", "16"],
}
# row -> (run, file suffix scored, label in the table)
CONFIGS: dict[str, tuple[str, str, str]] = {
    "plain": ("plain", "", "plain (the quick start's recipe)"),
    "masked": ("masked", "", "`--masks` (the triangle's coverage)"),
    "ema": ("plain", "-ema", "`--ema 0.99`: the -ema file"),
    "best": ("plain", "-best", "`--validation-images` (3 held-out renders) `--validate-every 50`: the -best file"),
    "loraplus": ("loraplus", "", "`--loraplus-ratio 16`"),
}
DEFAULT = ["plain", "masked", "ema", "best"]


def make_dataset(folder: Path) -> Path:
    """The training images (8, with their masks in `masks/`) and 3 held-out ones in `validation/`."""
    _render(folder, 8, 21_000_000)
    _render(folder / "validation", 3, 22_000_000, masks=False)
    return folder


def _render(folder: Path, n: int, seed: int, masks: bool = True) -> None:
    """`n` purple triangles rendered by the toy world (`world.place`, `world.shape_mask`, its colours) on two-colour
    stripes of random colours, width and direction, with their masks (the shape's anti-aliased coverage) in
    `folder/masks/`. Seeded: the same bytes every time."""
    from PIL import Image

    from sdlora.formats.file_io import save_png
    from sdlora.toy import world

    rng = np.random.default_rng(seed)
    (folder / "masks" if masks else folder).mkdir(parents=True, exist_ok=True)
    palette = np.array(list(world.BACKGROUNDS.values()) + list(world.COLOURS.values()), dtype=np.float64)
    for i in range(n):
        scene = world.place(rng, "purple", "triangle", "black")
        cover = world.shape_mask(scene.shape, scene.cx, scene.cy, scene.r)[..., None]
        colours = []
        while len(colours) < 2:  # far from every world colour and background, so neither reads as one
            c = rng.uniform(0, 255, 3)
            if np.sqrt(((palette - c) ** 2).sum(1)).min() > 90:
                colours.append(c)
        width, vertical = int(rng.integers(2, 6)), bool(rng.integers(2))
        idx = np.arange(world.SIZE) // width % 2
        stripes = np.array(colours)[idx[None, :] if vertical else idx[:, None]]
        stripes = np.broadcast_to(stripes, (world.SIZE, world.SIZE, 3))
        fg = np.clip(np.array(world.COLOURS["purple"], dtype=np.float64) + np.array(scene.jitter), 0, 255)
        img = np.round(cover * fg + (1 - cover) * stripes).astype(np.uint8)
        save_png(Image.fromarray(img), folder / f"{i:02d}.png")
        if masks:
            mask = Image.fromarray(np.round(cover[..., 0] * 255).astype(np.uint8), "L")
            save_png(mask, folder / "masks" / f"{i:02d}.png")


def background_leak(images: list[np.ndarray]) -> float:
    """Share of images whose border pixels are, on average, farther than BACKGROUND_TOLERANCE from the nearest
    world background colour (what the toy judge reads the background from)."""
    from sdlora.toy import world

    bgs = np.array(list(world.BACKGROUNDS.values()), dtype=np.float64) / 255
    bad = 0
    for im in images:
        img = np.asarray(im, dtype=np.float64) / 255
        border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
        dist = np.sqrt(((border[:, None, :] - bgs[None]) ** 2).sum(-1))  # [pixels, backgrounds]
        bad += float(dist.mean(0).min()) > BACKGROUND_TOLERANCE
    return bad / len(images)


def train_cmd(run: str, seed: int, out: Path, class_images: Path) -> list[str]:
    return [sys.executable, "-m", "sdlora", "train", *RECIPE, "--images", str(DATA), "--class-images",
            str(class_images), *RUNS[run], "--seed", str(seed), "--out", str(out / f"{run}_s{seed}.safetensors")]


def train(name: str, seed: int, out: Path, class_images: Path) -> Path:
    """The file row `name` scores, trained by its run unless that run's files are there."""
    run, suffix, _ = CONFIGS[name]
    adapter, log = out / f"{run}_s{seed}.safetensors", out / f"{run}_s{seed}.log"
    scored = adapter.with_name(adapter.stem + suffix + ".safetensors")
    if not adapter.exists():
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), OMP_NUM_THREADS=THREADS,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(log, "w") as f:
            r = subprocess.run(train_cmd(name, seed, out, class_images), stdout=f, stderr=subprocess.STDOUT, env=env,
                               cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"{run} seed {seed} failed (exit {r.returncode}); see {log}")
    return scored


def score(base, adapter: Path, cache: dict) -> dict:
    from sdlora.eval.toy_score import generate, score_adapter
    from sdlora.formats.read import read_adapter
    from sdlora.infer.blend import Blender

    sc = score_adapter(base, adapter, TRIGGER, SUBJECT, base_cache=cache)
    blender = Blender(base)  # the trigger prompt's images again (same seed as score_adapter's): their backgrounds
    name = blender.add(read_adapter(adapter)).file.name
    blender.set_strengths({name: 1.0})
    try:
        images = generate(base, [TRIGGER], 8, 0)[TRIGGER]
    finally:
        blender.set_strengths({})
    out = dict(fidelity=100 * sc.subject_fidelity, leak=100 * sc.class_leak, drift=sc.drift,
               background=100 * background_leak(images))
    if "base_background" not in cache:
        cache["base_background"] = 100 * background_leak(generate(base, [TRIGGER], 8, 0)[TRIGGER])
    return out


def table(results: dict, names: list[str], seeds: list[int], base_background: float | None) -> str:
    head = ("| run | subject fidelity % (mean; " + "/".join(f"s{s}" for s in seeds) + ") | background leak % "
            f"(mean; per seed; base {base_background:.1f}) | class leak % (mean; per seed) "
            "| drift, points (mean; per seed) |")
    rows = [head, "|---|---|---|---|---|"]
    for n in names:
        rs = [results[n][s] for s in seeds if s in results[n]]
        if not rs:
            continue

        def cell(k: str, fmt) -> str:
            per = "/".join(fmt(results[n][s][k]) if s in results[n] else "–" for s in seeds)
            return f"{fmt(statistics.mean(r[k] for r in rs))} ({per})"

        pct, sign = (lambda x: f"{x:.1f}"), (lambda x: f"{x:+.1f}")
        rows.append(f"| {CONFIGS[n][2]} | {cell('fidelity', pct)} | {cell('background', pct)} | {cell('leak', pct)} "
                    f"| {cell('drift', sign)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT, choices=list(CONFIGS), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/toyruns/controls"), help="adapters, logs, results.json")
    p.add_argument("--make-dataset", type=Path, metavar="DIR", help="render the data set into DIR and exit")
    a = p.parse_args(argv)
    if a.make_dataset:
        print(make_dataset(a.make_dataset))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    class_images = a.out / "class"
    jobs = [(n, s) for s in a.seeds for n in a.configs]
    runs = sorted({(CONFIGS[n][0], s) for n, s in jobs})
    print(f"{len(runs)} runs; e.g. {' '.join(train_cmd(*runs[0], a.out, class_images)[1:])}", flush=True)

    import torch

    from sdlora.models import load_base

    torch.set_num_threads(int(THREADS))
    base, cache = load_base("toy"), {}
    rpath = a.out / "results.json"
    saved = json.loads(rpath.read_text()) if rpath.exists() else {}
    results: dict = {n: {} for n in a.configs}
    t0 = time.time()
    for n, s in jobs:
        adapter = train(n, s, a.out, class_images)
        key = f"{n}_s{s}"
        if key in saved and saved[key].get("mtime") == adapter.stat().st_mtime:
            results[n][s] = saved[key]
        else:
            results[n][s] = saved[key] = score(base, adapter, cache) | {"mtime": adapter.stat().st_mtime}
            saved["base_background"] = cache["base_background"]
            rpath.write_text(json.dumps(saved, indent=1))
        r = results[n][s]
        print(f"[{time.time() - t0:5.0f}s] {n} seed {s}: fidelity {r['fidelity']:.1f}%, background leak "
              f"{r['background']:.1f}%, class leak {r['leak']:.1f}%, drift {r['drift']:+.1f}", flush=True)
    print()
    print(table(results, a.configs, a.seeds, saved.get("base_background")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
