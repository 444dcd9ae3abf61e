"""The checks of issue 20's training controls (text: clip skip and long captions; LoRA+; kohya's network, rank and
module dropout; cosine-with-restarts and polynomial schedules; --targets/--exclude), called from
`TrainConfig.__post_init__` (the metadata they add is `sdlora.formats.meta._controls_metadata`'s).

Light at import (no torch): `sdlora.config` imports it to validate flags before anything heavy loads. What a check
needs the loaded model for (a family without CLIP hidden states, an encoder with fewer layers than the clip skip)
is `sdlora.train.long_prompts.check_family`'s.
"""

from __future__ import annotations

import re

from sdlora.lora import kinds
from sdlora.lora.targets import regexes

POLY_LR_END = 1e-7  # diffusers' polynomial schedule decays to this rate (its lr_end default)
CHUNK = 75  # tokens of a caption per CLIP chunk (77 with its BOS and EOS)
MAX_CLIP_SKIP = 24  # no CLIP text encoder has more layers (OpenCLIP bigG: 32 but SDXL reads 31; checked on load)
# settings a checkpoint must share with the run that resumes it (sdlora/train/ckpt.py IDENTITY)
RESUME_IDENTITY = ("targets", "exclude", "loraplus_ratio", "network_dropout", "rank_dropout", "module_dropout",
                   "lr_restarts", "lr_scheduler_power", "clip_skip", "max_token_length")


def check(cfg, bad) -> None:
    """One-line errors for the issue-20 options of `cfg` (a TrainConfig); `bad(field, why)` raises."""
    for name in ("targets", "exclude"):
        text = getattr(cfg, name)
        if text is not None and not regexes(text):
            bad(name, "is empty; give comma-separated regexes of module names, e.g. 'attn1\\.to_q,ff\\.net'")
        for r in regexes(text):
            try:
                re.compile(r)
            except re.error as e:
                bad(name, f"{r!r} is not a valid regex ({e}); escape dots and brackets with a backslash")
    pair = kinds.trained(cfg.network).pair if cfg.network in kinds.NETWORKS else True
    if cfg.loraplus_ratio is not None:
        if not cfg.loraplus_ratio > 0:
            bad("loraplus_ratio", f"must be positive (kohya suggests 16), got {cfg.loraplus_ratio}")
        if not pair:
            bad("loraplus_ratio", f"needs a down/up pair (--network lora or locon), not --network {cfg.network}")
    for name in ("network_dropout", "rank_dropout", "module_dropout"):
        p = getattr(cfg, name)
        if p is None:
            continue
        if not 0 <= p < 1:
            bad(name, f"must be in [0, 1), got {p}")
        if not pair or cfg.dora:
            bad(name, f"is kohya's LoRA dropout: it needs --network lora or locon without --dora, not "
                f"--network {cfg.network}{' --dora' if cfg.dora else ''}")
    if cfg.lr_restarts < 1:
        bad("lr_restarts", f"must be at least 1, got {cfg.lr_restarts}")
    if cfg.lr_restarts != 1 and cfg.lr_scheduler != "cosine_with_restarts":
        bad("lr_restarts", f"applies to --lr-scheduler cosine_with_restarts, not {cfg.lr_scheduler}")
    if cfg.epochs is None and cfg.lr_restarts > max(cfg.steps - cfg.warmup_steps, 1):
        bad("lr_restarts", f"{cfg.lr_restarts} cycles do not fit in the {cfg.steps - cfg.warmup_steps} steps after "
            "warmup; use fewer")
    if not cfg.lr_scheduler_power > 0:
        bad("lr_scheduler_power", f"must be positive, got {cfg.lr_scheduler_power}")
    if cfg.lr_scheduler == "polynomial" and cfg.lr <= POLY_LR_END:
        bad("lr", f"must be above the polynomial schedule's end rate {POLY_LR_END:g}, got {cfg.lr:g}")
    if cfg.lr_scheduler_power != 1 and cfg.lr_scheduler != "polynomial":
        bad("lr_scheduler_power", f"applies to --lr-scheduler polynomial, not {cfg.lr_scheduler}")
    if cfg.clip_skip is not None and not 1 <= cfg.clip_skip <= MAX_CLIP_SKIP:
        bad("clip_skip", f"must be between 1 and {MAX_CLIP_SKIP} (1: the last layer, 2: the penultimate), "
            f"got {cfg.clip_skip}")


def chunks(cfg) -> int:
    """CLIP chunks per caption: --max-token-length / 75 (1 by default)."""
    return (cfg.max_token_length or CHUNK) // CHUNK
