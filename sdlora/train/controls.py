"""The training controls the loop runs beside its steps (issue 20): the moving average of the LoRA weights (`--ema`,
ema.py) and the validation loss with the best step's adapter (validation.py). One record, so that the loop calls
four hooks: `start` before the first step, `after_step` after each optimizer step, `state`/`load` for checkpoints,
and `finish` after the last step."""

from __future__ import annotations

from sdlora.formats import meta
from sdlora.train import ema as E
from sdlora.train.validation import Validator


class Controls:
    def __init__(self, loop, params: dict):
        """`loop`: the sdlora.train.loop._Loop these controls run in (its config, data, writer); `params`: its
        trainable LoRA parameters by name."""
        self.loop = loop
        self.ema = E.of(loop.cfg, params)
        self.val = Validator(loop) if loop.data.validation else None
        if loop.pos.extra:  # resumed: the checkpoint's average and best step
            self.load(*loop.pos.extra)

    def start(self, step: int) -> None:
        if self.val:
            self.val(step)

    def after_step(self, done: int, steps: int) -> None:
        if self.ema:
            self.ema.step(done)
        if self.val and done < steps and self.val.due(done, steps):
            self.val(done)

    def state(self) -> tuple[dict, dict]:
        tensors, values = {}, {}
        for part in (self.ema, self.val):
            if part:
                t, v = part.state()
                tensors |= t
                values |= v
        return tensors, values

    def load(self, tensors: dict, values: dict) -> None:
        for part in (self.ema, self.val):
            if part:
                part.load(tensors, values)

    def finish(self, done: int, interrupted: bool = False) -> None:
        """After the last step: the last validation, and the average written as <output stem>-ema.safetensors.
        `interrupted` (Ctrl-C, main process only): the average only."""
        loop = self.loop
        if self.val and not interrupted:
            self.val(done)
        if self.ema:
            if not interrupted:
                loop.env.accelerator.wait_for_everyone()
            with self.ema.swapped():
                updates = self.ema.model.optimization_step
                loop.save_adapter(E.path_for(loop.cfg.output_path), md=meta.ema_metadata(updates))
