"""GPU check: speed and peak memory of sdlora's own training loop on SD 1.5-, SDXL-, SD 3.5 Medium- and
FLUX.1-dev-shaped models, in minutes.

    python benchmarks/gpu_check.py --out gpu-check.md                  # one CUDA GPU, under 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick --out t.md     # CPU smoke run on the tiny models
    python benchmarks/gpu_check.py --dry-run                           # the rows it would run, nothing trained

The models are random weights built from the public configs in sdlora/archs/{sd15,sdxl,sd35,flux1}/
(diffusers/transformers `from_config`: no download, no token; CLIP's BPE stands in for T5's tokenizer), trained at
their native resolution (512 / 1024 px) on random images by
`sdlora.train.loop.train` with a `make_config` config, exactly as `sdlora train` runs:

1. the grid: each shape × batch 1 and 4 × with/without gradient checkpointing (bf16, AdamW, rank 4, UNet + text
   encoder as `sdlora train` does by default);
2. every preset in configs/*.toml for a few steps on its model's random-weight shape (prior preservation with a
   few class images where the preset does it): the memory each preset really needs;
3. each other optimizer (adamw8bit, prodigy, adafactor, schedulefree; adamw is the grid's) at batch 1 on SD 1.5;
4. speed options on SD 1.5 at batch 4: --channels-last, --attention efficient/flash, --compile;
5. the optimizers on SDXL;
6. block swap: FLUX.1-dev with 16 and 28 blocks swapped, SD 3.5 Medium with 12 (after the grid), and the memory
   presets (flux-dev-8/12/16/24gb, sd35l/sd35m-12/16gb, sdxl-8gb), which plan themselves with `vram`.

Rows run in that order until `--budget-s` is near (the rest are listed as skipped); a row that fails (out of
memory, a missing package) becomes a row saying why. it/s counts the steps after the first (which pays for
warm-up); peak memory is `torch.cuda.max_memory_allocated` of the whole run (latent caching included), and
`reserved` what the caching allocator held. Prints a markdown table and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import: the loop's bars, one line per row instead

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree")
# shape -> (arch config folder in sdlora/archs, native resolution); quick mode uses sdlora's built-in tiny models
SHAPES = {"sd15": ("sd15", 512), "sdxl": ("sdxl", 1024), "sd35m": ("sd35", 1024), "flux": ("flux1", 1024),
          "sd35l": ("sd35", 1024)}
VARIANTS = {"sd35l": "_large"}  # shape -> the denoiser config file's suffix (SD 3.5 Large: transformer_large.json)
QUICK_SHAPES = {"tiny": ("tiny", 64), "tiny-sdxl": ("tiny-sdxl", 64), "tiny-sd3": ("tiny-sd3", 64),
                "tiny-flux": ("tiny-flux", 64)}


def _shape_of(model: str, quick: bool) -> str:
    """The SHAPES (or, quick, QUICK_SHAPES) key of a preset's hub model."""
    m = model.lower()
    family = "flux" if "flux" in m else "sd3" if "stable-diffusion-3" in m else "sdxl" if "xl" in m else "sd15"
    if quick:
        return {"flux": "tiny-flux", "sd3": "tiny-sd3", "sdxl": "tiny-sdxl", "sd15": "tiny"}[family]
    if family == "sd3" and "large" in m:
        return "sd35l"
    return {"flux": "flux", "sd3": "sd35m", "sdxl": "sdxl", "sd15": "sd15"}[family]


@dataclass
class Row:
    what: str  # the row's label
    shape: str  # a key of SHAPES/QUICK_SHAPES, or a built-in model name (presets on tiny/toy)
    values: dict  # make_config values on top of the common ones
    class_images: bool = False  # train with prior preservation on a few random class images
    result: dict = field(default_factory=dict)


def plan(quick: bool, steps: int, resolution: int | None = None) -> list[Row]:
    shapes = QUICK_SHAPES if quick else SHAPES
    common = {"mixed_precision": "no" if quick else "bf16", "steps": steps}
    if resolution:
        common["resolution"] = resolution
    rows = []
    for shape, (_, res) in shapes.items():
        if shape in VARIANTS:  # SD 3.5 Large: its presets only
            continue
        res = resolution or res
        for bs in (1, 4):
            for gc_ in (False, True):
                rows.append(Row(f"{shape} {res}px b{bs}{' gc' if gc_ else ''}", shape,
                                common | {"batch_size": bs, "gradient_checkpointing": gc_}))
    # block swap (issue 23): the same FLUX.1 / SD 3.5 Medium row with N blocks in host memory, so peak memory and
    # s/step are measured against the unswapped row above (GPU figures pending until a GPU runs this)
    dit = [k for k in shapes if k in ("flux", "sd35m", "tiny-flux", "tiny-sd3")]
    for shape in dit:
        for n in (16, 28) if "flux" in shape else (12,):
            rows.append(Row(f"{shape} {resolution or shapes[shape][1]}px b1 gc swap {n}", shape,
                            common | {"batch_size": 1, "gradient_checkpointing": True, "blocks_to_swap": n}))
    for path in sorted((ROOT / "configs").glob("*.toml")):
        rows.append(preset_row(path, steps, quick))
        if resolution:
            rows[-1].values["resolution"] = resolution
    optimizer_rows = {shape: [Row(f"{shape} b1 {opt}", shape, common | {"optimizer": opt,
                                                                         "lr": 1.0 if opt == "prodigy" else 1e-4})
                              for opt in OPTIMIZERS[1:]] for shape in shapes}
    first = next(iter(shapes))
    rows += optimizer_rows.pop(first)
    speed_rows = [("channels-last", {"channels_last": True}), ("attention flash", {"attention": "flash"})]
    if not quick:  # the memory-efficient kernel is CUDA-only; compiling takes minutes on a CPU
        speed_rows += [("attention efficient", {"attention": "efficient"}), ("compile", {"compile": True})]
    for name, v in speed_rows:
        rows.append(Row(f"{first} b4 {name}", first, common | {"batch_size": 4} | v))
    return rows + [r for more in optimizer_rows.values() for r in more]


def preset_row(path: Path, steps: int, quick: bool) -> Row:
    from sdlora.config import load_toml
    from sdlora.models import BUILTIN_MODELS

    values = load_toml(path)
    model = values.pop("model", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    if model in BUILTIN_MODELS:
        shape = model
    elif quick:  # the preset's settings on the tiny shape of its family, at 64 px
        shape = _shape_of(model, quick)
        values["resolution"] = 64
    else:
        shape = _shape_of(model, quick)
    if quick:  # a CPU has no VRAM to plan for: the preset's other settings on the tiny model
        values.pop("vram", None)
    elif "vram" in values:  # `--vram` plans from the preset's model (its public configs), not the random base
        values["model"] = model
    if quick and values.get("mixed_precision") == "fp16":
        values["mixed_precision"] = "bf16"  # fp16 needs CUDA
    for k in ("epochs", "save_every", "sample_every", "keep_last", "num_class_images"):
        values.pop(k, None)
    values |= {"steps": steps, "warmup_steps": 0}
    prior = "num_class_images" in load_toml(path)
    return Row(f"preset {path.stem}", shape, values, class_images=prior)


def random_images(folder: Path, n: int, size: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return folder


def random_base(shape: str, device):
    """A BaseModel of `shape` (sd15/sdxl/sd35m/flux) with random weights from sdlora's public configs, built
    (initialised) on `device`, fast on a GPU, then handed over on the CPU in fp32, as `load_base` hands over a model
    read from disk."""
    import torch

    from sdlora import archs
    from sdlora.archs.clip_tokenizer import clip_tokenizer
    from sdlora.models import from_components

    config_dir, res = SHAPES[shape]
    spec = next(s for s in archs.SPECS.values() if s.config_dir == config_dir)
    parts = {"scheduler_config": archs.load_config(spec.id, "scheduler")}
    torch.manual_seed(0)  # the same weights every row: the latent cache of the first row serves the others
    with torch.device(device):
        parts["vae"] = archs.build(archs.load_config(spec.id, "vae"))
        parts[spec.denoiser] = archs.build(archs.load_config(spec.id, spec.denoiser + VARIANTS.get(shape, "")))
        for t in spec.text_encoders:
            tok = clip_tokenizer(t.pad_token)
            cfg = archs.load_config(spec.id, t.attr)
            if t.kind == "t5":  # CLIP's BPE stands in for T5's tokenizer: T5's vocabulary grows to fit its ids,
                cfg |= {"vocab_size": len(tok)}  # and prompts are as long as the family trains them
                tok.model_max_length = t.max_length
            parts[t.attr] = archs.build(cfg).eval()
            parts[t.tokenizer_attr] = tok
    for k, v in parts.items():
        if isinstance(v, torch.nn.Module):
            v.to("cpu")
    return from_components(f"random-{shape}", spec, parts, res)


def run_row(row: Row, data: Path, device: str, quick: bool) -> dict:
    import torch

    from sdlora.config import make_config
    from sdlora.train.loop import train

    res = (QUICK_SHAPES if quick else SHAPES).get(row.shape, (None, None))[1]
    values = {"images": str(data / f"inst-{res or 'native'}"), "prompt": "sks dog", "model": row.shape, "rank": 4,
              "seed": 0, "no_eval_loss": True, "out": str(data / "out" / "check.safetensors"),
              "cache_dir": str(data / "cache"), "overwrite": True} | row.values
    if row.class_images:  # the 2 random class images, none generated
        values |= {"class_prompt": "a photo of a dog", "class_images": str(data / f"class-{res or 'native'}"),
                   "num_class_images": 2}
    cuda = device == "cuda"
    t0 = time.perf_counter()
    base = random_base(row.shape, device) if row.shape in SHAPES else None
    if cuda:  # the peak of the run alone: the random model is on the CPU by now, as a loaded one would be
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    r = train(make_config(values), log=lambda *a, **k: None, base=base)
    total = time.perf_counter() - t0
    warm_steps = r.steps - 1
    out = {"it/s": f"{warm_steps / r.steady_seconds:.2f}" if r.steady_seconds else "-",
           "s total": f"{total:.0f}"}
    if cuda:
        out |= {"peak": f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
                "reserved": f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB"}
    else:
        out |= {"peak": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)",
                "reserved": "-"}
    del r, base
    return out


def table(rows: list[Row], header: str) -> str:
    cols = ["row", "it/s", "peak", "reserved", "s total", "note"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        r = row.result or {"note": "not run"}
        lines.append("| " + " | ".join([row.what] + [str(r.get(c, "")) for c in cols[1:]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file to write the table to")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop adding rows when this many seconds are near")
    ap.add_argument("--steps", type=int, default=None, help="steps per row (default 8; 2 with --quick)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="the tiny built-in models at 64 px (for CPU)")
    ap.add_argument("--only", default=None, help="run only rows whose label contains this text")
    ap.add_argument("--resolution", type=int, default=None,
                    help="train every row at this size instead of the native one (e.g. a CPU trial of the real shapes)")
    ap.add_argument("--dry-run", action="store_true", help="list the rows; train nothing")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 8)
    rows = plan(args.quick, steps, args.resolution)
    if args.only:
        rows = [r for r in rows if args.only in r.what]
    if args.dry_run:
        text = table(rows, f"gpu_check dry run: {len(rows)} rows, {steps} steps each")
        print(text)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured. Run it on a CUDA "
              "machine, or `--device cpu --quick` for a smoke run on the tiny models.")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    t_start = time.perf_counter()
    last_cost: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sdlora-gpu-check-") as d:
        data = Path(d)
        for _, res in (QUICK_SHAPES if args.quick else SHAPES).values():
            random_images(data / f"inst-{res}", 4, args.resolution or res, seed=0)
            random_images(data / f"class-{res}", 2, args.resolution or res, seed=1)
        random_images(data / "inst-native", 4, 64, seed=0)  # the built-in tiny/toy presets
        random_images(data / "class-native", 2, 64, seed=1)
        for row in rows:
            elapsed = time.perf_counter() - t_start
            # the slowest row of this shape so far; a shape not run yet is guessed at the slowest row of any shape
            expected = last_cost.get(row.shape, max(last_cost.values(), default=0.0))
            if elapsed + expected > args.budget_s:
                row.result = {"note": f"skipped: budget ({elapsed:.0f} s used of {args.budget_s:.0f}, a "
                                      f"{row.shape} row takes ~{expected:.0f} s)"}
                continue
            t0 = time.perf_counter()
            try:
                row.result = run_row(row, data, args.device, args.quick) | {"note": "ok"}
            except Exception as e:  # one failed row (OOM, a missing package) must not lose the others
                first = (str(e).strip().splitlines() or [""])[0][:160].replace("|", "/")
                row.result = {"note": f"failed: {type(e).__name__}: {first}"}
                if not args.quick:
                    traceback.print_exc(limit=3)
            finally:
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            last_cost[row.shape] = max(last_cost.get(row.shape, 0.0), time.perf_counter() - t0)
            print(f"[{time.perf_counter() - t_start:5.0f} s] {row.what}: {row.result}", flush=True)
    header = (f"## gpu_check: {name}, torch {torch.__version__}, {steps} steps per row, rank 4, "
              f"{time.perf_counter() - t_start:.0f} s in all")
    text = table(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
