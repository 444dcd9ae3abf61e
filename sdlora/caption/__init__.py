"""Captioning a folder of images before training: `sdlora caption DIR` (command.py) and `caption_folder`, its
Python form; one module per captioner (toy, blip, florence2, wd14)."""

from sdlora.caption.command import CaptionReport, caption_folder

__all__ = ["CaptionReport", "caption_folder"]
