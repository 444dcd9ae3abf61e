"""Adapter kinds (and recipe variants) on the toy world: train each over several seeds, score each adapter with the
toy judge exactly as `sdlora eval --subject "a purple triangle"` does, print a markdown table.

    python benchmarks/toy_kinds.py                          # the kinds table in README (5 kinds x 3 seeds)
    python benchmarks/toy_kinds.py --configs default notext # the prior-drift study in README
    python benchmarks/toy_kinds.py --list                   # the configurations and their flags
    python benchmarks/toy_kinds.py --configs base-fp32 base-bf16 base-fp8 base-int8 base-nf4 --out /tmp/toyruns/quant
                                                            # a quantised base (README, RESULTS.md)

Every run is the quick start (`sdlora train --model toy --images datasets/toy-purple-triangle --prompt "a sks
triangle" --class-prompt "a triangle" --num-class-images 40 --steps 600 --lr 1e-3`) plus the configuration's flags
and `--seed S`, trained by the `sdlora train` CLI in a subprocess (the log of each run is kept beside its adapter).
All runs share one class-image folder (`--class-images`, generated once by the first run), so they differ only by
their flags and seed. Adapters already in `--out` are scored again, not retrained (delete the folder to retrain).
Scoring happens in this process with one base model whose images are generated once (`score_adapter`'s cache):
the figures are those `sdlora eval` prints. On 2 CPU threads a run takes about a minute, a score half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--model", "toy", "--images", str(ROOT / "datasets" / "toy-purple-triangle"),
              "--prompt", "a sks triangle", "--class-prompt", "a triangle", "--num-class-images", "40",
              "--steps", "600", "--lr", "1e-3"]
SUBJECT = "a purple triangle"

# name -> (flags added to the quick start, label in the table). Ranks of the kinds are chosen for a comparable number
# of trainable parameters (about 20k; the toy UNet + text encoder, preset "default"); LoHa cannot go below 41k
# here (rank 1, its 3x3 convs included), so it gets its smallest.
CONFIGS: dict[str, tuple[list[str], str]] = {
    "lora": (["--rank", "8"], "lora, rank 8"),
    "dora": (["--rank", "8", "--dora"], "lora + DoRA, rank 8"),
    "locon": (["--network", "locon", "--rank", "2", "--conv-rank", "1"], "locon, rank 2, 3x3 convs rank 1"),
    "loha": (["--network", "loha", "--rank", "1"], "loha, rank 1 (3x3 convs rank 1)"),
    "lokr": (["--network", "lokr", "--rank", "4"], "lokr, rank 4, factor -1 (3x3 convs too)"),
    # the prior-drift study (point 5 of issue 12): the quick start as it is, and one change at a time
    "default": ([], "the quick start (lora rank 4)"),
    "notext": (["--no-text-encoder"], "`--no-text-encoder`"),
    "telr": (["--te-lr", "1e-4"], "`--te-lr 1e-4`"),
    "notext-lr2e-3": (["--no-text-encoder", "--lr", "2e-3"], "`--no-text-encoder --lr 2e-3`"),
    "telr2e-4": (["--te-lr", "2e-4"], "`--te-lr 2e-4`"),
    "telr-900": (["--te-lr", "1e-4", "--steps", "900"], "`--te-lr 1e-4 --steps 900`"),
    "telr-r8": (["--te-lr", "1e-4", "--rank", "8"], "`--te-lr 1e-4 --rank 8`"),
    "notext-1200": (["--no-text-encoder", "--steps", "1200"], "`--no-text-encoder --steps 1200`"),
    "noflip": (["--no-flip"], "`--no-flip`"),
    "prior2": (["--prior-loss-weight", "2"], "`--prior-loss-weight 2`"),
    "lr5e-4": (["--lr", "5e-4"], "`--lr 5e-4`"),
    # a quantised frozen UNet (issue 23): the quick start with its Linear layers stored narrower, computing in fp32
    "base-fp32": ([], "the quick start, fp32 base"),
    "base-bf16": (["--base-precision", "bf16"], "`--base-precision bf16`"),
    "base-fp8": (["--base-precision", "fp8"], "`--base-precision fp8`"),
    "base-int8": (["--base-precision", "int8"], "`--base-precision int8`"),
    "base-nf4": (["--base-precision", "nf4"], "`--base-precision nf4`"),
}
KINDS = ["lora", "dora", "locon", "loha", "lokr"]


def train_cmd(name: str, seed: int, out: Path, class_images: Path) -> list[str]:
    flags, _ = CONFIGS[name]
    return [sys.executable, "-m", "sdlora", "train", *QUICKSTART, "--class-images", str(class_images), *flags,
            "--seed", str(seed), "--out", str(out / f"{name}_s{seed}.safetensors")]


def train(name: str, seed: int, out: Path, class_images: Path) -> tuple[Path, int | None]:
    adapter, log = out / f"{name}_s{seed}.safetensors", out / f"{name}_s{seed}.log"
    if not adapter.exists():
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(log, "w") as f:
            r = subprocess.run(train_cmd(name, seed, out, class_images), stdout=f, stderr=subprocess.STDOUT, env=env,
                               cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"{name} seed {seed} failed (exit {r.returncode}); see {log}")
    m = re.search(r"^total\s+\d+\s+([\d,]+)", log.read_text(), re.M) if log.exists() else None
    return adapter, int(m.group(1).replace(",", "")) if m else None


def pct(x: float) -> str:
    return f"{x:.1f}"


def table(results: dict, names: list[str], seeds: list[int]) -> str:
    head = ("| run | trainable params | subject fidelity % (mean; " + "/".join(f"s{s}" for s in seeds) + ") "
            "| class leak % (mean; per seed) | drift, points (mean; median; per seed) |")
    rows = [head, "|---|---|---|---|---|"]
    for n in names:
        rs = [results[n][s] for s in seeds if s in results[n]]
        if not rs:
            continue
        def cell(k: str, fmt) -> str:  # mean (and median for drift), then every seed ("–": not run yet)
            v = [r[k] for r in rs]
            per = "/".join(fmt(results[n][s][k]) if s in results[n] else "–" for s in seeds)
            mid = f"; {fmt(statistics.median(v))}" if k == "drift" else ""
            return f"{fmt(statistics.mean(v))}{mid} ({per})"

        sign = lambda x: f"{x:+.1f}"  # noqa: E731
        rows.append(f"| {CONFIGS[n][1]} | {rs[0]['params']:,} | {cell('fidelity', pct)} | {cell('leak', pct)} "
                    f"| {cell('drift', sign)} |")
    return "\n".join(rows)


def run_and_score(jobs: list[tuple[str, int]], out: Path, class_images: Path, n_jobs: int = 1,
                  trigger_of=lambda name: "a sks triangle", class_prompt: str | None = None) -> dict:
    """Train each (config, seed) of `jobs`, `n_jobs` at a time (`train`: an adapter already in `out` is kept), and
    score each adapter with the toy judge (its trigger prompt `trigger_of(config)`), printing a line per run; a
    score already in out/results.json for the same adapter file (mtime) is reused. Returns {config: {seed: row}}."""
    if not (class_images.is_dir() and len(list(class_images.glob("*.png"))) >= 40):
        train(*jobs[0], out, class_images)  # makes the class images once, before parallel runs read them

    import torch  # noqa: F401  (after the subprocess-only part)

    from sdlora.eval.toy_score import score_adapter
    from sdlora.models import load_base

    base, cache = load_base("toy"), {}
    rpath = out / "results.json"
    saved = json.loads(rpath.read_text()) if rpath.exists() else {}
    results: dict = {n: {} for n, _ in jobs}
    t0 = time.time()
    with ThreadPoolExecutor(max(1, n_jobs)) as pool:
        futs = [(n, s, pool.submit(train, n, s, out, class_images)) for n, s in jobs]
        for n, s, fut in futs:
            adapter, params = fut.result()
            key = f"{n}_s{s}"
            if key in saved and saved[key].get("mtime") == adapter.stat().st_mtime:
                results[n][s] = saved[key]
            else:
                sc = score_adapter(base, adapter, trigger_of(n), SUBJECT, class_prompt=class_prompt, base_cache=cache)
                results[n][s] = saved[key] = dict(
                    params=params, fidelity=100 * sc.subject_fidelity, leak=100 * sc.class_leak, drift=sc.drift,
                    prompt_fidelity=100 * sc.prompt_fidelity, base_prompt_fidelity=100 * sc.prompt_fidelity_base,
                    mtime=adapter.stat().st_mtime)
                rpath.write_text(json.dumps(saved, indent=1))
            r = results[n][s]
            print(f"[{time.time() - t0:5.0f}s] {n} seed {s}: fidelity {r['fidelity']:.1f}%, leak {r['leak']:.1f}%, "
                  f"drift {r['drift']:+.1f} ({r['params']:,} params)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=KINDS, choices=list(CONFIGS), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/toyruns/kinds"), help="adapters, logs and results.json")
    p.add_argument("--class-images", type=Path, default=None, help="shared class-image folder "
                   "(default: OUT/class); generated by the first run when empty")
    p.add_argument("-j", "--jobs", type=int, default=1, help="training runs at a time (default 1)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    a = p.parse_args(argv)
    if a.list:
        for n, (flags, label) in CONFIGS.items():
            print(f"{n:8s} {label:45s} {' '.join(flags)}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    class_images = a.class_images or a.out / "class"
    jobs = [(n, s) for s in a.seeds for n in a.configs]
    print(f"{len(jobs)} runs; e.g. {' '.join(train_cmd(*jobs[0], a.out, class_images)[1:])}", flush=True)
    results = run_and_score(jobs, a.out, class_images, a.jobs)
    print()
    print(table(results, a.configs, a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
