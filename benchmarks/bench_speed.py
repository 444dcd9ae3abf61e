"""Speed, memory and start-up of `sdlora train` next to the plain-PyTorch floor, as one table.

    python benchmarks/bench_speed.py            # tiny at 128 px, and an SD 1.5-shaped random model at 256 px
    python benchmarks/bench_speed.py --quick    # tiny only, a few steps (tests/test_benchmarks.py runs this)

Every row is a fresh subprocess (one CPU thread unless --threads), so start-up and peak RSS are what a user gets:

    s/step      median seconds per step (between consecutive step ends; sdlora writes them when SDLORA_STEP_TIMES
                names a file), over the steps that encoded no latent when there are any: latents are encoded
                when first needed, so early steps also pay for the VAE (that cost is in `whole`)
    to step 1   seconds from starting the process to the start of step 1 (imports, model load, first latents)
    peak RSS    the process's peak resident memory (os.wait4)
    whole       seconds from starting the process to its exit
    after last  seconds from the end of the last step to the exit (final eval, adapter written and verified)

The setting is the issue's: UNet attn2 to_q/to_v (preset `default`, `--no-text-encoder`), rank 4, fp32, batch 1,
the 5 photos of datasets/dog, a fresh latent cache for each run. `sdlora` rows run the CLI as a user would, once
with the loss on fixed noise and once with --no-eval-loss. `floor` rows are plain PyTorch + PEFT on the same
UNet and latent size: `fwd` a no-grad forward, `fwd+bwd` a forward, backward and AdamW step with LoRA on attn2
to_q/to_v (no data, no caches, no saving): what any trainer must pay per step.

The SD 1.5-shaped model is the public SD 1.5 configs (sdlora/archs/sd15) with seeded random weights, saved once
as a diffusers folder (--sd15-dir, default ~/.cache/sdlora/bench/random-sd15, 4 GB) and loaded from there as a
downloaded model would be. Not a test: numbers for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "datasets" / "dog"
RANK = 4
TARGETS = r".*\.attn2\.to_(q|v)"  # what preset `default` adapts in the UNet


# ---------------------------------------------------------------- the SD 1.5-shaped model

def ensure_sd15(folder: Path) -> Path:
    """A diffusers folder of SD 1.5's architecture with seeded random weights, built once (about 20 s)."""
    if (folder / "model_index.json").is_file():
        return folder
    print(f"building the SD 1.5-shaped random model into {folder} (once)", flush=True)
    code = ("import sys, torch\nsys.path.insert(0, sys.argv[2])\n"
            "from diffusers import PNDMScheduler, StableDiffusionPipeline\n"
            "from sdlora.archs import build, load_config\n"
            "from sdlora.archs.clip_tokenizer import clip_tokenizer\n"
            "torch.manual_seed(0)\ntok = clip_tokenizer()\n"
            "te = build(load_config('sd15', 'text_encoder') | {'bos_token_id': tok.bos_token_id, "
            "'eos_token_id': tok.eos_token_id, 'pad_token_id': tok.pad_token_id})\n"
            "pipe = StableDiffusionPipeline(vae=build(load_config('sd15', 'vae')), text_encoder=te, tokenizer=tok, "
            "unet=build(load_config('sd15', 'unet')), scheduler=PNDMScheduler.from_config(load_config('sd15', "
            "'scheduler')), safety_checker=None, feature_extractor=None, requires_safety_checker=False)\n"
            "pipe.save_pretrained(sys.argv[1] + '.tmp')\n")
    subprocess.run([sys.executable, "-c", code, str(folder), str(ROOT)], check=True)
    Path(str(folder) + ".tmp").rename(folder)
    return folder


# ---------------------------------------------------------------- one measured subprocess

def measure(cmd: list[str], env: dict, marks: Path | None = None) -> dict:
    """Run `cmd`; its wall time, peak RSS and, from the marks file, start of step 1 and step ends."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.time()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    r = {"whole": t1 - t0, "rss": usage.ru_maxrss / 1024, "out": out.decode(errors="replace")}
    if marks is not None:
        lines = [line.split() for line in marks.read_text().splitlines()]
        start = next(float(x[-1]) for x in lines if x[0] == "start")
        steps = [x for x in lines if x[0] == "step"]
        ends = [float(x[-1]) for x in steps]
        cached = [x[2] if len(x) == 4 else None for x in steps]  # "step N cached=K time"
        took = [(b - a, c is not None and c == before) for a, b, c, before in
                zip([start] + ends, ends, cached, [None] + cached)]
        steady = [t for t, same in took if same] or [t for t, _ in took]
        r |= {"to_step1": start - t0, "after": t1 - ends[-1], "s_step": statistics.median(steady)}
    return r


def sdlora_row(model: str, res: int, steps: int, env: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        marks = Path(d) / "marks"
        cmd = [sys.executable, "-m", "sdlora", "train", "--images", str(DOG), "--prompt", "sks dog", "--model", model,
               "--steps", str(steps), "--resolution", str(res), "--rank", str(RANK), "--preset", "default",
               "--no-text-encoder", "--mixed-precision", "no", "--batch-size", "1", "--seed", "0",
               "--out", str(Path(d) / "bench.safetensors"), "--cache-dir", str(Path(d) / "cache"), *extra]
        return measure(cmd, env | {"SDLORA_STEP_TIMES": str(marks)}, marks)


# ---------------------------------------------------------------- the plain-PyTorch floor (runs in a subprocess)

def floor(model: str, res: int, steps: int) -> None:
    """Print JSON: median s of a no-grad UNet forward and of a LoRA fwd+bwd+AdamW step, and the time to step 1."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    if model == "tiny":
        from sdlora.tiny import tiny_components

        unet = tiny_components()["unet"]
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    unet = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, res // 8, res // 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    first = time.time()
    step_s, fwd_s = [], []
    for _ in range(steps):
        a = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(latents, t, text).sample, latents)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - a)
    with torch.no_grad():
        for _ in range(steps):
            a = time.perf_counter()
            unet(latents, t, text)
            fwd_s.append(time.perf_counter() - a)
    print(json.dumps({"first": first, "step": statistics.median(step_s), "fwd": statistics.median(fwd_s)}))


def floor_rows(model: str, res: int, steps: int, env: dict) -> list[dict]:
    t0 = time.time()
    r = measure([sys.executable, __file__, "--floor", model, str(res), str(steps)], env)
    got = json.loads(r["out"].strip().splitlines()[-1])
    common = {"to_step1": got["first"] - t0, "rss": r["rss"], "whole": r["whole"], "after": None}
    return [common | {"run": "floor fwd+bwd", "s_step": got["step"]},
            common | {"run": "floor fwd", "s_step": got["fwd"]}]


# ---------------------------------------------------------------- the table

def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny only, a few steps (for CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 30 tiny, 12 SD 1.5)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in every run")
    ap.add_argument("--sd15-dir", default=str(Path.home() / ".cache" / "sdlora" / "bench" / "random-sd15"))
    ap.add_argument("--floor", nargs=3, metavar=("MODEL", "RES", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        sys.path.insert(0, str(ROOT))
        return floor(args.floor[0], int(args.floor[1]), int(args.floor[2]))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    cases = [("tiny", "tiny", 128, args.steps or (6 if args.quick else 30))]
    if not args.quick:
        cases.append(("sd15-shaped", str(ensure_sd15(Path(args.sd15_dir).expanduser())), 256, args.steps or 12))
    print(f"sdlora train: UNet attn2 q/v, rank {RANK}, fp32, batch 1, datasets/dog (5 photos), "
          f"{args.threads} thread(s); floor: plain PyTorch + PEFT, same UNet and latent size")
    head = (f"{'model':12s} {'px':>4s} {'run':24s} {'steps':>5s} {'s/step':>8s} {'to step 1 s':>11s} "
            f"{'peak RSS MiB':>12s} {'whole s':>8s} {'after last s':>12s}")
    print(head + "\n" + "-" * len(head), flush=True)
    for label, model, res, steps in cases:
        rows = [sdlora_row(model, res, steps, env, []) | {"run": "sdlora"},
                sdlora_row(model, res, steps, env, ["--no-eval-loss"]) | {"run": "sdlora --no-eval-loss"},
                *floor_rows(model, res, min(steps, 5), env)]
        for r in rows:
            n = min(steps, 5) if r["run"].startswith("floor") else steps
            print(f"{label:12s} {res:4d} {r['run']:24s} {n:5d} {r['s_step']:8.3f} {r['to_step1']:11.1f} "
                  f"{r['rss']:12.0f} {r['whole']:8.1f} {fmt(r['after'], '12.1f')}", flush=True)


if __name__ == "__main__":
    main()
