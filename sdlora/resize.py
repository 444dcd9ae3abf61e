"""`sdlora resize`: lower a LoRA's rank by truncated SVD of each module's delta, keeping its scale."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora import guard
from sdlora.errors import SdloraError
from sdlora.formats import kohya
from sdlora.formats.adapter import AdapterModule
from sdlora.formats.convert import check_written
from sdlora.formats.read import read_adapter


def resize_module(m: AdapterModule, rank: int) -> tuple[AdapterModule, float, float]:
    """(module', kept energy, total energy): up'·down'·alpha'/rank' is the best rank-`rank` approximation of the
    delta; alpha'/rank' = alpha/r (kohya's resize_lora convention), so strengths mean the same."""
    down, up = m.tensors["down"], m.tensors["up"]
    scale = m.scale
    d = m.delta().double() / scale  # up @ down, shaped like the weight
    u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
    n = min(rank, m.rank, s.numel())
    root = s[:n].sqrt()
    new_up, new_down = u[:, :n] * root, root[:, None] * vh[:n]
    if down.dim() == 4:
        new_down = new_down.reshape(n, *down.shape[1:])
        new_up = new_up.reshape(up.shape[0], n, 1, 1)
    total = float((s ** 2).sum()) * scale ** 2
    kept = float((s[:n] ** 2).sum()) * scale ** 2
    new = AdapterModule(m.name, m.kind, {"down": new_down.to(down.dtype), "up": new_up.to(up.dtype)}, scale * n)
    return new, kept, total


def resize(src, out, rank: int, overwrite: bool = False) -> tuple[float, float]:
    """Write `src` at rank `rank` to `out` (kohya layout); returns (fraction of the delta's energy kept overall,
    worst module)."""
    if rank < 1:
        raise SdloraError(f"--rank must be at least 1, got {rank}")
    guard.check_file(out, inputs={"FILE": src}, overwrite=overwrite)
    adapter = read_adapter(src)
    other = sorted({m.kind + (" (Tucker)" if "mid" in m.tensors else "") for m in adapter.modules.values()
                    if not m.kind_spec.plain_pair or "mid" in m.tensors})
    if other:
        raise SdloraError(f"{src}: resize lowers the rank of LoRA/LoCon pairs; this file holds {', '.join(other)} "
                          "modules, whose rank is not a truncated SVD; retrain at a lower rank instead")
    kept_all = total_all = 0.0
    worst = 1.0
    for name, m in adapter.modules.items():
        adapter.modules[name], kept, total = resize_module(m, rank)
        kept_all += kept
        total_all += total
        if total > 0:
            worst = min(worst, kept / total)
    md = dict(adapter.metadata)
    if "ss_network_dim" in md:
        old = md["ss_network_dim"]
        md["ss_network_dim"] = str(rank)
        try:
            md["ss_network_alpha"] = str(float(md["ss_network_alpha"]) * rank / float(old))
        except (KeyError, ValueError):
            pass
    with guard.OutputLock(out):
        kohya.save(kohya.to_tensors(adapter), Path(out), md)
        check_written(out, adapter.modules)
    return (kept_all / total_all if total_all else 1.0), worst


def add_resize_args(p) -> None:
    p.add_argument("file", help="LoRA .safetensors (kohya, diffusers, PEFT) or PEFT folder")
    p.add_argument("--rank", type=int, required=True, help="new rank (modules already at or below it are re-factored)")
    p.add_argument("--out", default=None, help="output file (default: FILE with -rN before .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def cmd_resize(args) -> int:
    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}-r{args.rank}.safetensors")
    frac, worst = resize(src, out, args.rank, args.overwrite)
    print(f"kept {frac:.2%} of the delta's energy (squared Frobenius norm); worst module {worst:.2%}")
    print(out)
    return 0
