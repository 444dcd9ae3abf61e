"""`sdlora resize`: lower a kohya LoRA's rank by truncated SVD of each module's delta, keeping its scale."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats import io, kohya


def resize_module(down: torch.Tensor, up: torch.Tensor, alpha: float | None, rank: int):
    """(down', up', alpha', kept energy, total energy) for one module: up'·down'·alpha'/rank' is the best rank-`rank`
    approximation of the delta; alpha'/rank' = alpha/r (kohya's resize_lora convention), so strengths mean the same."""
    r = down.shape[0]
    scale = (float(alpha) if alpha else r) / r
    d = kohya.delta(down, up, alpha).double() / scale  # up @ down, shaped like the weight
    m = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    n = min(rank, r, s.numel())
    root = s[:n].sqrt()
    new_up = (u[:, :n] * root)
    new_down = (root[:, None] * vh[:n])
    if down.dim() == 4:
        new_down = new_down.reshape(n, *down.shape[1:])
        new_up = new_up.reshape(up.shape[0], n, 1, 1)
    total = float((s ** 2).sum()) * scale ** 2
    kept = float((s[:n] ** 2).sum()) * scale ** 2
    return new_down.to(down.dtype), new_up.to(up.dtype), scale * n, kept, total


def resize(src, out, rank: int) -> tuple[float, float]:
    """Write `src` at rank `rank` to `out`; returns (fraction of the delta's energy kept overall, worst module)."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1, got {rank}")
    tensors, metadata = io.load(Path(src))
    groups = kohya.group(tensors)
    stray = groups.pop("", {})
    if not groups:
        raise SdloraError(f"{src}: no kohya LoRA modules; convert it first with `sdlora convert --to kohya`")
    new = dict(stray)
    kept_all = total_all = 0.0
    worst = 1.0
    for name, p in groups.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            new.update({f"{name}.{s}": t for s, t in p.items()})
            continue
        alpha = p.get("alpha")
        down, up, a, kept, total = resize_module(p["lora_down.weight"], p["lora_up.weight"],
                                                 None if alpha is None else float(alpha.float()), rank)
        new[f"{name}.lora_down.weight"] = down.contiguous()
        new[f"{name}.lora_up.weight"] = up.contiguous()
        new[f"{name}.alpha"] = torch.tensor(a, dtype=(alpha.dtype if alpha is not None else down.dtype))
        kept_all += kept
        total_all += total
        if total > 0:
            worst = min(worst, kept / total)
    md = dict(metadata)
    if "ss_network_dim" in md:
        old = md["ss_network_dim"]
        md["ss_network_dim"] = str(rank)
        try:
            md["ss_network_alpha"] = str(float(md["ss_network_alpha"]) * rank / float(old))
        except (KeyError, ValueError):
            pass
    md.pop("sshs_model_hash", None)
    md.pop("sshs_legacy_hash", None)
    from sdlora.adapter import save

    save(new, Path(out), md)
    return (kept_all / total_all if total_all else 1.0), worst


def add_resize_args(p) -> None:
    p.add_argument("file", help="kohya LoRA .safetensors")
    p.add_argument("--rank", type=int, required=True, help="new rank (modules already at or below it are re-factored)")
    p.add_argument("--out", default=None, help="output file (default: FILE with -rN before .safetensors)")


def cmd_resize(args) -> int:
    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}-r{args.rank}.safetensors")
    frac, worst = resize(src, out, args.rank)
    print(f"kept {frac:.2%} of the delta's energy (squared Frobenius norm); worst module {worst:.2%}")
    print(out)
    return 0
