"""Aspect-ratio buckets: the training sizes of about resolution² pixels, and the one an image trains at."""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with about resolution² pixels and aspect ratio up to `max_ratio`."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s (in log space, so 2:1 and 1:2 are equally far from 1:1)."""
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))
