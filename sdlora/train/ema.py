"""`--ema DECAY`: an exponential moving average of the LoRA weights, saved as `<output stem>-ema.safetensors`.

The average is diffusers' `EMAModel` over the trainable LoRA parameters (what diffusers' own training scripts use):
every `--ema-update-every` optimizer steps, shadow ← shadow − (1 − d)·(shadow − weights), with d = min(DECAY,
(1 + n)/(10 + n)) at its n-th update after the first (the first update copies the weights: d = 0). The shadow weights
live in fp32 on the weights' device; a checkpoint holds them and the update count (tensors in its safetensors, the
count in its manifest), so a resumed run continues the same average bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

PREFIX = "ema/"  # the checkpoint tensors of the shadow weights: ema/<parameter name>


def path_for(output: Path) -> Path:
    return output.with_name(output.stem + "-ema.safetensors")


class LoraEMA:
    """The moving average of the named LoRA parameters `params` ({name: parameter})."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, every: int):
        from diffusers.training_utils import EMAModel

        self.names, self.params, self.every = list(params), list(params.values()), every
        self.model = EMAModel(self.params, decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False)

    def step(self, done: int) -> None:
        """After optimizer step `done` (1-based): update when it is a multiple of `--ema-update-every`."""
        if done % self.every == 0:
            self.model.step(self.params)

    @contextmanager
    def swapped(self):
        """Inside: the LoRA parameters hold the average (to save or evaluate it); the trained ones after."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, values) for a checkpoint."""
        tensors = {PREFIX + n: s.detach().to("cpu", torch.float32).contiguous()
                   for n, s in zip(self.names, self.model.shadow_params)}
        return tensors, {"ema_updates": self.model.optimization_step}

    def load(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        """Continue from a checkpoint's `state()`; a checkpoint without one cannot carry the average on."""
        from sdlora.errors import SdloraError

        missing = [n for n in self.names if PREFIX + n not in tensors]
        if missing or not isinstance(values.get("ema_updates"), int):
            raise SdloraError("the checkpoint has no --ema state (it was saved without --ema): resume without --ema, "
                              "or start a new run")
        for s, n in zip(self.model.shadow_params, self.names):
            s.copy_(tensors[PREFIX + n])
        self.model.optimization_step = values["ema_updates"]


def of(cfg, params: dict[str, torch.nn.Parameter]) -> LoraEMA | None:
    return LoraEMA(params, cfg.ema, cfg.ema_update_every) if cfg.ema else None
