"""What people look at rather than read: fixed-seed sample grids, a loss curve image, TensorBoard scalars; and for
programs watching a run (app.py's Train tab), its progress as JSON lines (--progress-file)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdlora.formats.file_io import atomic_write
from sdlora.infer.text import prompt_args
from sdlora.lora.tokens import pipeline_prompts

UNRELATED_PROMPT = "a photo of a mountain lake at sunrise"


def sample_prompts(text: str | None, prompt: str, class_prompt: str | None) -> list[str]:
    """The prompts of the sample grid: those in `text`, separated by ';'; by default the trigger prompt (did it
    learn?), the class prompt without trigger (did the class drift?) and an unrelated one (did all drift?)."""
    if text:
        return [p.strip() for p in text.split(";") if p.strip()]
    return [prompt] + ([class_prompt] if class_prompt else []) + [UNRELATED_PROMPT]


def _save_png(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@torch.no_grad()
def sample_grid(base, prompts: list[str], resolution: int, seeds=(1, 2), steps: int = 20,
                title: str = "") -> Image.Image:
    """One row per prompt, one column per seed, generated with the model as it is now (LoRA active)."""
    pipe = base.pipeline()
    pipe.set_progress_bar_config(disable=True)
    label_h = 14
    cell = max(resolution, 96)
    grid = Image.new("RGB", (cell * len(seeds), (cell + label_h) * len(prompts) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), title, fill="black")
    for r, prompt in enumerate(prompts):
        y = label_h + r * (cell + label_h)
        draw.text((2, y + 1), prompt[:60], fill="black")
        for c, seed in enumerate(seeds):
            # --pivotal: the trigger as its new tokens, also where the pipeline does not expand it (SD 3.x)
            # and at the run's clip skip (sdlora.infer.text)
            text = pipeline_prompts(pipe, base.spec, base.tokenizers, prompt, None)
            img = pipe(**prompt_args(base, prompt, text=text), height=resolution, width=resolution,
                       num_inference_steps=steps, **base.generation_kwargs(),
                       generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y + label_h))
    return grid


def loss_curve(losses: list[float], path: Path, title: str = "training loss",
               validation: list[tuple[int, float]] | None = None) -> Path:
    """A plain line chart of per-step loss and its moving average, as a PNG (no plotting library needed);
    `validation`: (step, loss) points drawn on the same axes, in orange, joined."""
    w, h, pad = 640, 320, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    validation = validation or []
    d.text((pad, 8), title + (" (blue), validation loss (orange)" if validation else ""), fill="black")
    if losses:
        lo = min(losses + [v for _, v in validation])
        hi = max(losses + [v for _, v in validation])
        span = (hi - lo) or 1.0
        n = len(losses)

        def xy(i, v):
            return pad + (w - 2 * pad) * (i / max(n - 1, 1)), h - pad - (h - 2 * pad) * ((v - lo) / span)

        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        ema, smooth = None, []
        for v in losses:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
        if validation:  # step s is loss index s - 1 (step 0, before training, at the left edge)
            pts = [xy(max(s - 1, 0), v) for s, v in validation]
            if len(pts) > 1:
                d.line(pts, fill=(230, 120, 20), width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
        d.text((4, pad - 6), f"{hi:.3f}", fill="black")
        d.text((4, h - pad - 6), f"{lo:.3f}", fill="black")
        d.text((w - pad - 30, h - pad + 8), f"step {n}", fill="black")
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    return _save_png(img, path)


class Progress:
    """--progress-file: one JSON object a line, appended and flushed as the run goes, so that a reader polling the
    file sees whole lines: {"event": "start", "steps": N, "start_step": k}, then {"event": "step", "step": s,
    "loss": l, "lr": r} for every step (written when the losses are read from the device, every few steps) and
    {"event": "sample", "step": s, "path": grid.png}; each with "time" (Unix seconds). A resumed run appends."""

    def __init__(self, path: str | Path | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: str, **fields) -> None:
        if self.file:
            self.file.write(json.dumps({"event": event, **fields, "time": round(time.time(), 3)}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


class Monitor:
    """Loss history, sample grids as PNGs, the progress file (--progress-file) and, optionally, TensorBoard and/or
    wandb (`log_with`, sdlora/train/logs.py; True: TensorBoard)."""

    def __init__(self, out_path: Path, log_with: str | bool | None, config: dict | None = None,
                 progress_file: str | None = None):
        self.out_path = out_path
        self.samples_dir = out_path.with_name(out_path.stem + "-samples")
        self.losses: list[float] = []
        self.validations: list[tuple[int, float]] = []  # (step, validation loss)
        self.writer = None
        self.progress = Progress(progress_file)
        if log_with:
            from sdlora.train.logs import Trackers

            self.writer = Trackers("tensorboard" if log_with is True else log_with,
                                   out_path.with_name(out_path.stem + "-logs"), out_path.stem, config)

    def begin(self, steps: int, start_step: int) -> None:
        self.progress("start", steps=steps, start_step=start_step)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        self.progress("step", step=step, loss=loss, lr=lr)
        if self.writer:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)

    def timesteps(self, step: int, values, name: str) -> None:
        """A histogram of the timesteps (`name`: "sigma" for rectified flow) drawn since the last call."""
        if self.writer and values is not None:
            self.writer.add_histogram(name, values, step)

    def validation(self, step: int, loss: float) -> None:
        self.validations.append((step, loss))
        if self.writer:
            self.writer.add_scalar("validation_loss", loss, step)

    def samples(self, step: int, base, prompts: list[str], resolution: int, steps: int) -> Path:
        grid = sample_grid(base, prompts, resolution, steps=steps, title=f"step {step}")
        path = _save_png(grid, self.samples_dir / f"step-{step:06d}.png")
        if self.writer:
            import numpy as np

            self.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        self.progress("sample", step=step, path=str(path))
        return path

    def close(self) -> Path | None:
        path = (loss_curve(self.losses, self.out_path.with_name(self.out_path.stem + "-loss.png"),
                           validation=self.validations) if self.losses else None)
        if self.writer:
            self.writer.close()
        self.progress.close()
        return path
