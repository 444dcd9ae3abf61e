"""Where each --timestep-sampling puts σ (SD 3.x / FLUX.1): mean, median and the share above 0.75 of 200,000 draws
(seed 7) at 512 and 1024 px, on SD 3.5's and FLUX.1-dev's own schedule configs. Prints README's table.

    python benchmarks/sigma_table.py
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdlora.archs import load_config
from sdlora.train import timesteps as T

SD3 = FlowMatchEulerDiscreteScheduler.from_config(load_config("sd3", "scheduler")).config
FLUX = FlowMatchEulerDiscreteScheduler.from_config(load_config("flux", "scheduler")).config
ROWS = [("uniform", "uniform", SD3), ("sigmoid (scale 1)", "sigmoid", SD3),
        ("logit-normal on SD 3.5 (shift 3)", None, SD3), ("logit-normal on FLUX.1-dev", None, FLUX),
        ("shift (k = 3)", "shift", SD3), ("flux-shift", "flux-shift", SD3)]


def main() -> None:
    print("| px | sampling | mean σ | median σ | share σ > 0.75 |\n|---|---|---|---|---|")
    for px in (512, 1024):
        shape = torch.Size((200_000, 16, px // 8, px // 8))
        for name, kind, config in ROWS:
            s = T.draw(kind, shape, torch.Generator().manual_seed(7), config)
            print(f"| {px} | {name} | {s.mean():.3f} | {s.median():.3f} | {(s > 0.75).float().mean():.3f} |")


if __name__ == "__main__":
    main()
