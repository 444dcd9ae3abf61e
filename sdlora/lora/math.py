"""The weight delta ΔW of an adapter module: pure tensor functions, the one place sdlora computes it.

W = W0 + scale · ΔW with scale = alpha / rank (alpha missing or 0: scale 1, as kohya, ComfyUI and A1111 read it).
"""

from __future__ import annotations

import torch


def lora_scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha else float(alpha) / rank


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/r)·up@down in fp32, shaped like the base weight: Linear [out, in], 1x1 conv [out, in, 1, 1], or a kxk
    LoCon conv (down [r, in, k, k], up [out, r, 1, 1]): kohya's `merge_to`,
    conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), i.e. up applied over down's output channels."""
    r = down.shape[0]
    scale = lora_scale(alpha, r)
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        d = torch.nn.functional.conv2d(down.float().permute(1, 0, 2, 3), up.float()).permute(1, 0, 2, 3)
        return d * scale
    d = up.reshape(up.shape[0], r).float() @ down.reshape(r, -1).float()
    if down.dim() == 4:
        d = d.reshape(up.shape[0], down.shape[1], 1, 1)
    return d * scale


def lora_delta_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """The shape of the base weight a (down, up) pair adapts."""
    if down.dim() == 4:
        return (up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return (up.shape[0], down.shape[1])


# ----------------------------------------------------------------------------------------------------------
# LyCORIS kinds (shared/LYCORIS_AND_DIT_FORMATS.md). Tensors are passed by role, never by key name:
#   LoCon Tucker: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
#   LoHa: w1a, w1b, w2a, w2b (plain: [out, r] / [r, in·kh·kw]; Tucker: [r, out] / [r, in] with t1, t2 [r, r, kh, kw])
#   LoKr: w1 or (w1a, w1b); w2 or (w2a, w2b), with t2 for Tucker (then w2a [r, b], w2b [r, d])
#   full: diff (shaped like the weight), diff_b (the bias delta, not part of ΔW)
#   DoRA: magnitude ([1, in(, 1, 1)] per input channel, or [out, 1(, 1, 1)] per output channel) on top of any kind


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """R[o, i, y, x] = Σ_{p,q} t[p, q, y, x] · wa[p, o] · wb[q, i] (LyCORIS `rebuild_tucker`, PEFT `make_weight_cp`)."""
    return torch.einsum("pqyx,po,qi->oiyx", t.float(), wa.float(), wb.float())


def locon_tucker_delta(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(alpha/r)·ΔW of a Tucker LoCon: ΔW[o, i, y, x] = Σ_{a,b} up[o, a] · mid[a, b, y, x] · down[b, i]."""
    r = down.shape[0]
    d = torch.einsum("oa,abyx,bi->oiyx", up.reshape(up.shape[0], -1).float(), mid.float(),
                     down.reshape(r, -1).float())
    return d * lora_scale(alpha, r)


def loha_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """(alpha/r)·(W1 ⊙ W2), r = w1b.shape[0]; plain: Wj = wja @ wjb (2-D, reshape to the weight's shape is the
    caller's), Tucker: Wj = tucker(tj, wja, wjb) (4-D)."""
    if "t1" in t:
        d = tucker(t["t1"], t["w1a"], t["w1b"]) * tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        d = (t["w1a"].float() @ t["w1b"].float()) * (t["w2a"].float() @ t["w2b"].float())
    return d * lora_scale(alpha, t["w1b"].shape[0])


def lokr_factors(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) of a LoKr module, fp32."""
    w1 = t["w1"].float() if "w1" in t else t["w1a"].float() @ t["w1b"].float()
    if "w2" in t:
        w2 = t["w2"].float()
    elif "t2" in t:
        w2 = tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        w2 = t["w2a"].float() @ t["w2b"].float()
    return w1, w2


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The r of alpha/r: w2b's rows, else w1b's; None when both factors are full (every loader then uses scale 1)."""
    if "w2b" in t:
        return int(t["w2b"].shape[0])
    if "w1b" in t:
        return int(t["w1b"].shape[0])
    return None


def lokr_delta(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """scale·kron(W1, W2) with W1 the left operand (LyCORIS `make_kron`, A1111, ComfyUI); W1 is unsqueezed to
    [a, c, 1, 1] for a 4-D W2. scale = alpha/r, or 1 when both factors are full (A1111, ComfyUI, diffusers)."""
    w1, w2 = lokr_factors(t)
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    r = lokr_rank(t)
    return torch.kron(w1.contiguous(), w2.contiguous()) * (1.0 if r is None else lora_scale(alpha, r))


def dora_delta(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """D(W + ΔW) − W, the DoRA update A1111 (`apply_weight_decompose`) and ComfyUI (`weight_decompose`) fuse
    (W' = W + m·(D(X) − W)), with ΔW already scaled. D(X) = magnitude · X / ‖X‖, the norm taken per input channel
    for a [1, in(, 1, 1)] magnitude (A1111's only form, LyCORIS wd_on_output=False), per output channel for
    [out, 1(, 1, 1)] (LyCORIS ≥ 2025-04). The norm is of X = W + ΔW, as LyCORIS and A1111 take it."""
    w = base.float()
    x = w + delta.reshape(w.shape)
    mag = magnitude.float()
    if mag.shape[0] == 1 and mag.numel() == w.shape[1]:  # per input channel
        norm = x.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    else:  # per output channel
        norm = x.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    return mag.reshape(norm.shape) * x / norm - w
