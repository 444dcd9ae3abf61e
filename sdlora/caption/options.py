"""What every captioner is given besides its model: the settings of `sdlora caption` that reach the models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    device: str | None = None  # None: a GPU when there is one
    max_new_tokens: int = 75  # generative captioners (BLIP, Florence-2): tokens the model may write
    florence_task: str = "<DETAILED_CAPTION>"
    threshold: float = 0.35  # WD14: general tags at or above this probability
    character_threshold: float = 0.85  # WD14: character tags at or above this probability
