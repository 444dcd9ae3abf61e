"""Training speed and memory: seconds per step and peak memory for a few configurations, in one run.

    python benchmarks/bench_train.py --model tiny                       # CPU, offline
    python benchmarks/bench_train.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30 \
        --configs "no" "fp16" "fp16+gc" --resolution 512                  # a GPU with SD 1.5 at hand
    python benchmarks/bench_train.py --configs no no+compile no+cl no+attn=math no+attn=eager   # speed options

A configuration is a mixed precision ("no", "fp16", "bf16") and options joined by "+": gc (gradient
checkpointing), compile (--compile), cl (--channels-last), attn=NAME (--attention NAME). Prints one row per
configuration: s/step (mean over the steps after the first, which pays for warm-up, caching and compiling; the
first step's seconds are printed too), peak GPU memory (CUDA) or peak RSS (CPU). Not a test: numbers, for the
README and issue notes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdlora.config import make_config  # noqa: E402
from sdlora.train.loop import train  # noqa: E402


def run(model: str, images: str, steps: int, resolution: int | None, spec: str, rank: int, preset: str) -> dict:
    mp, *options = spec.split("+")
    values = dict(images=images, prompt="sks dog", model=model, steps=steps, rank=rank, preset=preset,
                  mixed_precision=mp, seed=0, resolution=resolution)
    for o in options:
        key, _, value = o.partition("=")
        if key in ("gc", "compile", "cl"):
            values[{"gc": "gradient_checkpointing", "cl": "channels_last"}.get(key, key)] = True
        elif key == "attn":
            values["attention"] = value
        else:
            raise SystemExit(f"unknown option {o!r} in configuration {spec!r}: use gc, compile, cl or attn=NAME")
    with tempfile.TemporaryDirectory() as d:
        values |= {"out": str(Path(d) / "bench.safetensors"), "cache_dir": str(Path(d) / "cache")}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = train(make_config(values), log=lambda *a: None)
        total = time.perf_counter() - t0
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU" if torch.cuda.is_available()
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)")
    steady = result.steady_seconds / (result.steps - 1) if result.steady_seconds else result.seconds / result.steps
    return {"config": spec, "s_per_step": steady, "first_s": result.seconds - (result.steady_seconds or 0),
            "total_s": total, "peak": peak,
            "loss": f"{result.loss_before:.4f} -> {result.loss_after:.4f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--images", default=str(ROOT / "datasets" / "dog"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="mixed precision [+gc for gradient checkpointing], e.g. no fp16 bf16 fp16+gc")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs or (["no", "fp16", "bf16", "fp16+gc"] if torch.cuda.is_available() else ["no", "bf16"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {args.steps} steps, rank {args.rank}, preset {args.preset}, device {device}")
    print(f"{'config':16s} {'s/step':>9s} {'1st step s':>10s} {'total s':>9s}  peak memory              "
          "loss on fixed noise")
    for spec in configs:
        r = run(args.model, args.images, args.steps, args.resolution, spec, args.rank, args.preset)
        print(f"{r['config']:16s} {r['s_per_step']:9.4f} {r['first_s']:10.2f} {r['total_s']:9.1f}  {r['peak']:24s} "
              f"{r['loss']}", flush=True)


if __name__ == "__main__":
    main()
