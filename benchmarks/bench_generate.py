"""Seconds per image: the base model, 3 adapters fused by sdlora, and the same 3 adapters as unfused diffusers/PEFT
LoRA layers (load_lora_weights + set_adapters), side by side in one run. A benchmark, not a test.

    python benchmarks/bench_generate.py --model tiny --steps 20 --images 5
    python benchmarks/bench_generate.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --size 512

The adapters are written by this script as kohya files: rank --rank on every module of the `full` preset
(UNet transformer blocks and the text encoder's attention and MLP), random factors. (transformers' logging is
quietened: each `load_lora_weights` lists the other adapters' text-encoder weights as "MISSING", which is noise;
every adapter's weights do load.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers

from sdlora.formats import kohya
from sdlora.infer.session import DEFAULT_SCHEDULER, SCHEDULERS, Session, Settings, make_scheduler
from sdlora.lora.targets import find_targets
from sdlora.models import load_base

WEIGHTS = [0.8, 0.5, -0.4]


def write_adapters(base, folder: Path, rank: int) -> list[Path]:
    paths = []
    for i in range(len(WEIGHTS)):
        g = torch.Generator().manual_seed(i)
        layers = {}
        for component, model in base.components.items():
            for name in find_targets(model, component, "full"):
                w = model.get_submodule(name).weight
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.01  # 1x1 convs: [r, in, 1, 1]
                up = torch.randn(w.shape[0], rank, *(1,) * (w.dim() - 2), generator=g) * 0.01
                layers.setdefault(component, {})[name] = ("lora", {"down": down, "up": up}, rank / 2)
        path = folder / f"bench{i}.safetensors"
        adapter = kohya.from_trained(layers, base.arch)
        kohya.save(kohya.to_tensors(adapter), path, {"ss_base_model_version": base.base_model_version})
        paths.append(path)
    return paths


def per_image(run, n: int) -> float:
    run()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="default: the model's native resolution")
    p.add_argument("--images", type=int, default=5, help="timed images per configuration (after one warm-up)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32

    def loaded():
        base = load_base(args.model, dtype=dtype)
        for m in (base.unet, base.text_encoder, base.vae):
            m.to(args.device)
        return base

    fused = Session(base=loaded())
    size = args.size or fused.base.native_resolution
    settings = Settings(prompt="a photo of sks dog", seed=0, steps=args.steps, width=size, height=size)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_adapters(fused.base, Path(tmp), args.rank)
        rows = [("base model", per_image(lambda: fused.generate(settings, {}), args.images))]
        names = [fused.add(f).file.name for f in files]
        blend = dict(zip(names, WEIGHTS))
        rows.append(("3 adapters, fused (sdlora)", per_image(lambda: fused.generate(settings, blend), args.images)))
        modules = sum(len(r.targets) for r in fused.blender.adapters.values())
        fused = None  # frees the fused session before the diffusers pipeline loads (`del` would confuse pyflakes)

        base = loaded()
        pipe = base.pipeline(scheduler=make_scheduler(DEFAULT_SCHEDULER, base.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        for f, n in zip(files, names):
            pipe.load_lora_weights(str(f), adapter_name=n)
        pipe.set_adapters(names, adapter_weights=WEIGHTS)

        def unfused():
            pipe(prompt=settings.prompt, num_inference_steps=args.steps, guidance_scale=settings.guidance,
                 width=size, height=size, generator=torch.Generator("cpu").manual_seed(0))

        rows.append(("3 adapters, unfused (diffusers/PEFT)", per_image(unfused, args.images)))

    print(f"model {args.model} on {args.device} ({args.dtype}), {size}x{size}, {args.steps} steps "
          f"{SCHEDULERS[DEFAULT_SCHEDULER][2]}, CFG {settings.guidance}; 3 adapters of rank {args.rank}, "
          f"{modules // 3} modules each; mean of {args.images} images after a warm-up, torch threads "
          f"{torch.get_num_threads()}")
    width = max(len(r[0]) for r in rows)
    print(f"{'configuration'.ljust(width)}  s/image  vs base")
    for label, s in rows:
        print(f"{label.ljust(width)}  {s:7.3f}  {s / rows[0][1]:6.2f}x")


if __name__ == "__main__":
    main()
