"""Where a run's numbers go besides the loss curve (--log-with tensorboard|wandb|all; --tensorboard is
--log-with tensorboard): one writer with TensorBoard's calls (`add_scalar`, `add_image`, `add_histogram`) that
writes to TensorBoard's event files in <output>-logs/, to Weights & Biases, or to both.

wandb is optional and imported only when asked for (the config refuses --log-with wandb without it, naming
`pip install wandb`); WANDB_MODE=offline keeps its run in <output>-logs/wandb/ for a later `wandb sync`.
"""

from __future__ import annotations

import os
from pathlib import Path


class Trackers:
    def __init__(self, log_with: str, folder: Path, name: str, config: dict | None = None):
        self.tb = self.wandb = None
        if log_with in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(folder))
        if log_with in ("wandb", "all"):
            import wandb

            folder.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "sdlora"), name=name, dir=str(folder),
                                    config=config or {}, reinit="create_new")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb:
            self.tb.add_scalar(tag, value, step)
        if self.wandb:
            self.wandb.log({tag: value}, step=step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        """`image`: an HxWx3 uint8 array."""
        if self.tb:
            self.tb.add_image(tag, image, step, dataformats=dataformats)
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        """`values`: a 1-D CPU tensor (the σ or timesteps drawn since the last call)."""
        if self.tb:
            self.tb.add_histogram(tag, values, step)
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Histogram(values.numpy())}, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
