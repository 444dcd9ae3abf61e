"""full: a full weight difference (LyCORIS's "full" / kohya's `diff`), ΔW = diff, scale 1, no alpha.

Roles: diff (shaped like the weight) and diff_b (the bias delta, added to the layer's bias at the same strength;
not part of ΔW). Read and applied; sdlora does not train it.
"""

from __future__ import annotations

from sdlora.lora.kinds.base import KindSpec


class Full(KindSpec):
    def shape(self, t):
        return tuple(t["diff"].shape)

    def delta(self, t, alpha):
        return t["diff"].float()

    def problem(self, t, alpha):
        return None  # one tensor shaped like the weight: nothing to fit together


SPEC = Full("full", roles=("diff",), has_alpha=False)
