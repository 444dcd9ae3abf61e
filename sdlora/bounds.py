"""Bounds on every number that sizes the work or the memory of a command, in one place.

Each check is arithmetic on what the user typed or on a folder's listing, done before any model loads, and refuses
in one line naming the limit and the fix. Importing this module imports nothing heavy (option checks use it).
"""

from __future__ import annotations

import math

from sdlora.errors import SdloraError

MAX_REPEATS = 10_000  # --repeats and a kohya folder's N (`10_sks dog`); kohya users rarely go past 100
MAX_EPOCH_IMAGES = 1_000_000  # images × repeats of one epoch: the schedule lists each one
MAX_STEPS = 1_000_000  # optimizer steps of a run, whether from --steps or --epochs
MAX_EPOCHS = 100_000
MAX_SAMPLE_STEPS = 1_000  # denoising steps: the noise schedules have 1000 training timesteps
MAX_SIDE = 4096  # pixels per side of a generated image (as training's --resolution)
MAX_PIXELS = 4096 * 2048  # pixels of a generated image (8.4 MP; SDXL and FLUX are made for about 1 MP)
MAX_IMAGES = 1_000  # images of one `generate` call or app request
MAX_IMAGE_SEED = 2**63  # seeds of generated images: torch.Generator.manual_seed takes a signed 64-bit number
MAX_CLASS_IMAGES = 100_000  # --num-class-images
MAX_STRENGTH = 10.0  # |adapter strength|: A1111 users go to ±2; far beyond, the fused weights overflow (a black image)
SHOWN_CHARS = 200  # what is printed or stored in metadata of one caption or tag


def at_most(flag: str, value: int, limit: int, fix: str) -> None:
    """`flag value` must not exceed `limit`; the one-line refusal says the limit and `fix`."""
    if value > limit:
        raise SdloraError(f"{flag} {value} is more than the limit of {limit:,}; {fix}")


def strength(value: float, what: str) -> float:
    """An adapter strength: finite and within ±MAX_STRENGTH, the same rule in generate, merge and the app."""
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
        raise SdloraError(f"strength {value:g} of {what} is out of range: use a number between -{MAX_STRENGTH:g} and "
                          f"{MAX_STRENGTH:g} (1 applies the adapter as trained)")
    return value


def image_size(width: int, height: int) -> None:
    """A generated image's size: each side at most MAX_SIDE, and at most MAX_PIXELS in all."""
    if max(width, height) > MAX_SIDE:
        raise SdloraError(f"image size {width}x{height} is too large: each side at most {MAX_SIDE} px; use e.g. "
                          "1024x1024 (and upscale afterwards)")
    if width * height > MAX_PIXELS:
        raise SdloraError(f"image size {width}x{height} is {width * height / 1e6:.1f} MP, more than the "
                          f"{MAX_PIXELS / 1e6:.1f} MP limit; use a smaller size (and upscale afterwards)")


def epoch_images(per_epoch: int, repeats: int) -> str | None:
    """Why an epoch of `per_epoch` images (folder repeats and --repeats `repeats` counted) is too long, or None."""
    if per_epoch > MAX_EPOCH_IMAGES:
        return (f"one epoch is {per_epoch:,} images (files × folder repeats × --repeats {repeats}), more than the "
                f"limit of {MAX_EPOCH_IMAGES:,}; lower --repeats or the N of the N_words folders")
    return None


def steps_for_epochs(epochs: int, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of `epochs` epochs, refused past MAX_STEPS."""
    steps = math.ceil(batches_per_epoch * epochs / grad_accum)
    at_most("--epochs", epochs, MAX_EPOCHS, "train for fewer epochs")
    if steps > MAX_STEPS:
        raise SdloraError(f"--epochs {epochs} is {steps:,} steps ({batches_per_epoch:,} batches per epoch), more than "
                          f"the limit of {MAX_STEPS:,}; train for fewer epochs or lower --repeats")
    return steps


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` as printed or stored in metadata: cut at `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"
