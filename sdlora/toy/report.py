"""`python -m sdlora.toy report`: the judge's accuracy on held-out renders, the VAE's round trip, and the
base's judged accuracy per prompt."""

from __future__ import annotations

import time

import numpy as np
import torch

from sdlora.eval import toy_judge, toy_score
from sdlora.toy import world


@torch.no_grad()
def vae_roundtrip(vae, n: int = 200, seed: int = 11_000_000, combos=None) -> float:
    """Share of held-out renders still judged right (colour, shape, background) after VAE encode + decode."""
    combos = combos or world.SEEN_COMBOS
    scenes = [world.sample_scene(seed + i, combos) for i in range(n)]
    x = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    imgs = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    want = [{"colour": s.colour, "shape": s.shape, "background": s.background} for s in scenes]
    return float(np.mean([toy_judge.judge(im).matches(w) for im, w in zip(imgs, want)]))


def report(base, n: int = 8, backgrounds: bool = True, log=print) -> dict[str, float]:
    t0 = time.perf_counter()
    r = toy_judge.accuracy_on_renders(1000)
    rd = toy_judge.accuracy_on_renders(1000, degraded=True)
    log(f"judge on 1000 held-out renders: all {100 * r['all']:.1f}% (colour {100 * r['colour']:.1f}, shape "
        f"{100 * r['shape']:.1f}, background {100 * r['background']:.1f}); degraded (blur, noise, colour shift): "
        f"all {100 * rd['all']:.1f}%")
    held = tuple((c, s) for c, s in ((c, s) for s in world.SHAPES for c in world.COLOURS)
                 if (c, s) not in world.SEEN_COMBOS)
    log(f"VAE round trip judged right: seen {100 * vae_roundtrip(base.vae):.1f}%, "
        f"held-out subjects {100 * vae_roundtrip(base.vae, combos=held):.1f}%")
    prompts = world.seen_prompts(backgrounds) + ([] if not backgrounds else world.seen_prompts(False))
    acc = toy_score.prompt_accuracy(base, prompts, n)
    for p in prompts:
        log(f"  {100 * acc[p]:5.1f}%  {p}")
    full = [acc[p] for p in world.seen_prompts(True)] if backgrounds else []
    short = [acc[p] for p in world.seen_prompts(False)]
    if full:
        log(f"mean judged accuracy, colour+shape+background prompts: {100 * np.mean(full):.1f}% ({len(full)} prompts)")
    log(f"mean judged accuracy, colour+shape prompts: {100 * np.mean(short):.1f}% ({len(short)} prompts)")
    heldp = [world.caption(c, s) for c, s in held]
    hacc = toy_score.prompt_accuracy(base, heldp, n)
    log("held-out subjects (never seen in pretraining): " + ", ".join(f"{p} {100 * a:.0f}%" for p, a in hacc.items()))
    log(f"({n} images per prompt, {toy_score.STEPS} DPM++ steps, guidance {toy_score.GUIDANCE}; "
        f"{time.perf_counter() - t0:.0f}s)")
    return acc
