"""Judged accuracy of the toy base and of adapters on it: what `sdlora eval --model toy` and the toy tests
measure.

Images are generated with fixed seeds (image i of prompt p: seed `seed + 1000·p + i`, independent of batch
size) and judged by `sdlora.eval.toy_judge`. An image is right for a prompt when every attribute the prompt names
(colour, shape, background; see `world.parse_caption`) is what the judge sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdlora.eval import toy_judge
from sdlora.toy import world

STEPS = 20  # DPM-Solver++ steps
GUIDANCE = 5.0  # classifier-free guidance scale used for all toy measurements


@torch.no_grad()
def generate(base, prompts: list[str], n: int, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 128, progress=None) -> dict[str, list[np.ndarray]]:
    """`n` uint8 images [32, 32, 3] per prompt, deterministic for a given base, seed and settings.

    With `progress` (called with prompts done, total), each batch holds one prompt's images, so that progress
    can be told in prompts (the images are the same: each has its own generator)."""
    from sdlora.infer.session import make_scheduler

    pipe = base.pipeline(scheduler=make_scheduler("dpm++2m", base.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    jobs = [(p, i, seed + 1000 * k + i) for k, p in enumerate(prompts) for i in range(n)]
    out: dict[str, list[np.ndarray]] = {p: [] for p in prompts}
    size = base.native_resolution
    if progress is not None:
        batch = n
    for s in range(0, len(jobs), batch):
        chunk = jobs[s:s + batch]
        gens = [torch.Generator("cpu").manual_seed(j[2]) for j in chunk]
        imgs = pipe(prompt=[j[0] for j in chunk], num_inference_steps=steps, guidance_scale=guidance,
                    width=size, height=size, generator=gens, output_type="np").images
        for j, im in zip(chunk, imgs):
            out[j[0]].append(np.clip(np.round(im * 255), 0, 255).astype(np.uint8))
        if progress is not None:
            progress((s + len(chunk)) // n, len(prompts))
    return out


def judged(images: dict[str, list[np.ndarray]], want: dict[str, dict[str, str]] | None = None) -> dict[str, float]:
    """Share of each prompt's images that show what `want[prompt]` (default: what the prompt says) asks for."""
    acc = {}
    for p, imgs in images.items():
        w = (want or {}).get(p) or world.parse_caption(p)
        acc[p] = float(np.mean([toy_judge.judge(im).matches(w) for im in imgs]))
    return acc


def prompt_accuracy(base, prompts: list[str], n: int = 8, seed: int = 0, **kw) -> dict[str, float]:
    """Judged accuracy per prompt of `base` (with whatever adapters are fused into it now)."""
    return judged(generate(base, prompts, n, seed, **kw))


@dataclass
class AdapterScore:
    subject_fidelity: float  # share of trigger-prompt images judged as the subject
    subject_base: float  # the same share without the adapter (what the trigger prompt gave before)
    class_leak: float  # share of class-prompt images judged as the subject with the adapter (language drift)
    class_leak_base: float
    prompt_fidelity: float  # mean judged accuracy on the other prompts, with the adapter
    prompt_fidelity_base: float  # the same without the adapter
    per_prompt: dict[str, tuple[float, float]] = field(default_factory=dict)  # prompt -> (base, adapter)

    @property
    def drift(self) -> float:
        """Change of prompt fidelity, in accuracy points (negative: the adapter made other prompts worse)."""
        return 100 * (self.prompt_fidelity - self.prompt_fidelity_base)

    def lines(self) -> list[str]:
        return [f"subject fidelity   {100 * self.subject_fidelity:5.1f}%  (base: {100 * self.subject_base:.1f}%)",
                f"class-prompt leak  {100 * self.class_leak:5.1f}%  (base: {100 * self.class_leak_base:.1f}%)",
                f"prompt fidelity    {100 * self.prompt_fidelity:5.1f}%  (base: {100 * self.prompt_fidelity_base:.1f}%,"
                f" drift {self.drift:+.1f} points over {len(self.per_prompt)} prompts)"]


def score_adapter(base, adapter: str | Path, trigger_prompt: str, subject: str, class_prompt: str | None = None,
                  other_prompts: list[str] | None = None, n: int = 8, strength: float = 1.0, seed: int = 0,
                  base_cache: dict | None = None, progress=None) -> AdapterScore:
    """Score an adapter file on `base` (the toy model): subject fidelity of `trigger_prompt` judged against
    `subject` (a world caption such as "a purple triangle"), and judged accuracy on `other_prompts`
    (default: every seen colour × shape, no background) with and without the adapter.

    `base_cache` (a dict) keeps the base's accuracies between calls with the same prompts and settings;
    `progress(label, prompts done, total)` is told how far the base ("base model") and the adapter run are."""
    from sdlora.formats.read import read_adapter
    from sdlora.infer.blend import Blender

    other = other_prompts or world.seen_prompts(backgrounds=False)
    want = world.parse_caption(subject)
    if "shape" not in want:
        raise ValueError(f"subject {subject!r} names no shape of the toy world ({', '.join(world.SHAPES)})")
    cls = class_prompt or world.caption(None, want["shape"])
    prompts = [trigger_prompt, cls] + [p for p in other if p not in (trigger_prompt, cls)]
    key = (tuple(prompts), n, seed)
    cache = base_cache if base_cache is not None else {}
    spec = {trigger_prompt: want, cls: want}

    def run(label):
        report = None if progress is None else (lambda done, total: progress(label, done, total))
        imgs = generate(base, prompts, n, seed, progress=report)
        acc = judged({p: imgs[p] for p in prompts[2:]})
        subj = judged({p: imgs[p] for p in prompts[:2]}, spec)
        return subj, acc

    if key not in cache:
        cache[key] = run("base model")
    subj0, acc0 = cache[key]
    blender = Blender(base)
    name = blender.add(read_adapter(adapter)).file.name
    blender.set_strengths({name: strength})
    try:
        with blender.tokens():  # its learnt tokens (pivotal tuning), if it bundles any
            subj1, acc1 = run("with the adapter")
    finally:
        blender.set_strengths({})
    others = prompts[2:]
    return AdapterScore(
        subject_fidelity=subj1[trigger_prompt], subject_base=subj0[trigger_prompt],
        class_leak=subj1[cls], class_leak_base=subj0[cls],
        prompt_fidelity=float(np.mean([acc1[p] for p in others])),
        prompt_fidelity_base=float(np.mean([acc0[p] for p in others])),
        per_prompt={p: (acc0[p], acc1[p]) for p in others})


def class_images(base, prompt: str, folder: str | Path, n: int = 20, seed: int = 500_000) -> Path:
    """Generate `n` class images for prior preservation with the base into `folder` (PNG files)."""
    from PIL import Image

    from sdlora.formats.file_io import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(generate(base, [prompt], n, seed)[prompt]):
        save_png(Image.fromarray(im), folder / f"{i:03d}.png")
    return folder
