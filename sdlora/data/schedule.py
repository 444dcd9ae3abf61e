"""The batch schedule: which examples each micro-step trains on, deterministic in (seed, epoch) so that a resumed
run replays it; batches hold one size only (buckets)."""

from __future__ import annotations

import random

from sdlora.data.examples import Example


def epoch_batches(examples: list[Example], batch_size: int, repeats: int, epoch: int, seed: int) -> list[list[int]]:
    """The batches of one epoch: each example `repeats` × its own `repeats` times, shuffled by (seed, epoch), grouped
    so that a batch holds one size only; the last, short batch of a size is kept. Deterministic, so a resumed run
    replays it."""
    rng = random.Random(seed * 100_003 + epoch)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        by_size.setdefault(ex.size, []).extend([i] * (repeats * ex.repeats))
    batches = []
    for size in sorted(by_size):
        idx = by_size[size]
        rng.shuffle(idx)
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


class Schedule:
    """Which examples each micro-step trains on: deterministic in (seed, epoch), so a resumed run replays it.

    Process `rank` of `world` gets every world-th batch of an epoch; class examples (prior preservation) follow
    one shuffled order, as many per micro-step as instance examples. `position` continues a saved schedule.
    """

    def __init__(self, instance: list[Example], classes: list[Example], batch_size: int, repeats: int, seed: int,
                 rank: int = 0, world: int = 1, position: dict | None = None):
        self.instance, self.classes = instance, classes
        self.batch_size, self.repeats, self.seed, self.rank, self.world = batch_size, repeats, seed, rank, world
        pos = position or {"epoch": 0, "batch": 0, "micro": 0}
        self.epoch, self.batch, self.micro = pos["epoch"], pos["batch"], pos["micro"]
        self.class_order = list(range(len(classes)))
        random.Random(seed + 17).shuffle(self.class_order)
        self._batches = None

    def batches_per_epoch(self) -> int:
        return len(self._epoch(0)) // self.world

    def _epoch(self, epoch: int) -> list[list[int]]:
        b = epoch_batches(self.instance, self.batch_size, self.repeats, epoch, self.seed)
        b += b[: (-len(b)) % self.world]  # every process gets the same number of batches
        return b

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "micro": self.micro}

    def next(self) -> tuple[list[Example], list[Example]]:
        """The instance examples and class examples of the next micro-step."""
        if self._batches is None:
            self._batches = self._epoch(self.epoch)
        if self.batch * self.world >= len(self._batches):
            self.epoch, self.batch = self.epoch + 1, 0
            self._batches = self._epoch(self.epoch)
        idx = self._batches[self.batch * self.world + self.rank]
        self.batch += 1
        inst = [self.instance[i] for i in idx]
        cls = []
        if self.classes:
            start = (self.micro * self.world + self.rank) * len(idx)
            cls = [self.classes[self.class_order[(start + j) % len(self.classes)]] for j in range(len(idx))]
        self.micro += 1
        return inst, cls
