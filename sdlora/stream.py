"""Build a model without ever holding it whole: its modules on the meta device, then each block's tensors read from
.safetensors files, cast, assigned and quantised before the next block is read.

Why not `from_pretrained` / `from_single_file`: they read a whole shard (up to 10 GB for FLUX's T5-XXL, a whole
24 GB file for `flux1-dev.safetensors`) and quantise once everything is loaded; the single-file converters take a
whole state dict. Here each tensor is read alone — a row slice of a fused original tensor is read without the
rest (`get_slice`) — so the peak is the finished (quantised) blocks plus the block being read.

Why each block opens and closes its files: safetensors memory-maps a file, and every page read stays in the
process's resident set (as file-backed RSS) until the mapping closes, so reading a 24 GB file through one open
handle shows 24 GB of RSS (measured: a 2 GiB file read tensor by tensor through one `safe_open` leaves 2.1 GB of
RssFile); closed after each block, only the block's pages are ever resident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError, cause
from sdlora.train.memory import trim

Piece = tuple[str, int | None, int | None]  # (tensor name in its file, row start, row stop)


class Shape(tuple):
    """A header's tensor shape, also as `.shape` (so code written for tensors reads headers too)."""

    @property
    def shape(self):
        return self


@dataclass
class Files:
    """Tensor names -> the .safetensors file holding them (one single file, or a folder's shards), with the
    header facts (shape, dtype) read without any weight."""

    where: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, paths) -> "Files":
        from safetensors import SafetensorError, safe_open

        out = cls()
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.metadata |= dict(f.metadata() or {})
                    for k in f.keys():
                        s = f.get_slice(k)
                        out.where[k], out.shapes[k], out.dtypes[k] = Path(path), Shape(s.get_shape()), s.get_dtype()
            except (SafetensorError, OSError, ValueError) as e:
                raise SdloraError(f"{path}: not a readable .safetensors file ({cause(e)}); re-download or re-export "
                                  "it") from e
        return out

    def keys(self):
        return self.where.keys()

    def read(self, wanted: dict[str, tuple[Piece, ...]], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Every tensor of `wanted` (name -> its pieces, concatenated), in fresh memory of `dtype` (None: as
        stored); each file opened once, and closed before returning."""
        from safetensors import safe_open

        by_file: dict[Path, set[str]] = {}
        for pieces in wanted.values():
            for k, _, _ in pieces:
                by_file.setdefault(self.where[k], set()).add(k)
        parts: dict[Piece, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for pieces in wanted.values():
                    for piece in pieces:
                        k, a, b = piece
                        if k in names and piece not in parts:
                            t = f.get_tensor(k) if a is None else f.get_slice(k)[a:b]
                            parts[piece] = t.to(dtype or t.dtype, copy=True)  # off the mapping before it closes
        out = {}
        for name, pieces in wanted.items():
            ts = [parts[p] for p in pieces]
            out[name] = ts[0] if len(ts) == 1 else torch.cat(ts)
        return out


def blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`model` cut into the pieces it is built from: each element of its ModuleLists (transformer blocks, T5's
    and CLIP's layers), and every other child whole (embedders, final layers). Parameters held directly by a
    module that also holds a ModuleList are in none of them (`materialise` reads those last)."""
    def has_list(m):
        return any(isinstance(x, torch.nn.ModuleList) for x in m.modules())

    def split(prefix, m):
        out = []
        for name, child in m.named_children():
            path = prefix + name
            if isinstance(child, torch.nn.ModuleList):
                out += [(f"{path}.{i}", b) for i, b in enumerate(child)]
            elif has_list(child):
                out += split(path + ".", child)
            else:
                out.append((path, child))
        return out

    return split("", model)


def _set(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    (model.get_submodule(mod_name) if mod_name else model)._parameters[attr] = param


def check_sources(model: torch.nn.Module, sources: dict, files: Files, what: str, flag: str) -> None:
    """Every parameter of `model` has a source in `files`, of the right shape: one line before anything is read."""
    params = dict(model.named_parameters())
    own = params | dict(model.named_buffers())
    missing = sorted(set(params) - set(sources))
    absent = sorted({k for pieces in sources.values() for k, _, _ in pieces if k not in files.where})
    if missing or absent:
        first = missing[0] if missing else absent[0]
        raise SdloraError(f"{what} lacks {len(missing) + len(absent)} tensors (e.g. {first}); the file is "
                          f"incomplete or of another model{flag}")
    for name, pieces in sources.items():
        if name not in own:
            continue
        rows = sum((b - a) if a is not None else files.shapes[k][0] for k, a, b in pieces)
        k = pieces[0][0]
        shape = (rows, *files.shapes[k][1:]) if files.shapes[k] else files.shapes[k]
        if tuple(shape) != tuple(own[name].shape) and own[name].numel() != _numel(shape):
            raise SdloraError(f"{what}: {k} is {list(files.shapes[k])}, the model needs {list(own[name].shape)} "
                              f"for {name}; the file is of another model{flag}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def materialise(model: torch.nn.Module, sources: dict, files: Files, dtype: torch.dtype, quantize=None,
                counter: dict | None = None) -> torch.nn.Module:
    """Give the meta-device `model` its weights from `files`, one block at a time: read (cast to `dtype` on the
    way), assign, then `quantize(name, block)` before the next block is read. Tied parameters (T5's shared
    embedding) are read once. `counter["peak"]`: the most bytes of unquantised weights held at once (one block),
    for tests."""
    ties: dict[int, list[str]] = {}
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(name)
        shapes[name] = p.shape
    alias = {n: names[0] for names in ties.values() for n in names}
    done: dict[str, torch.Tensor] = {}

    def load(prefix, names):
        wanted = {}
        for full in names:
            if alias[full] in done:
                _set(model, full, done[alias[full]])
            elif alias[full] not in wanted:
                wanted[alias[full]] = sources[alias[full]] if alias[full] in sources else sources[full]
        tensors = files.read(wanted, dtype)
        if counter is not None:
            held = sum(t.numel() * t.element_size() for t in tensors.values())
            counter["peak"] = max(counter.get("peak", 0), held)
        for key, t in tensors.items():
            param = torch.nn.Parameter(t.reshape(shapes[key]) if t.shape != shapes[key] else t, requires_grad=False)
            for full in ties[id(_meta[key])]:
                _set(model, full, param)
            if len(ties[id(_meta[key])]) > 1:  # kept only for a tied name in a later block: the others must go
                done[key] = param  # when their block is quantised

    _meta = dict(model.named_parameters())
    for prefix, block in blocks(model):
        load(prefix, [f"{prefix}.{n}" for n, p in block.named_parameters(remove_duplicate=False) if p.is_meta])
        if quantize is not None:
            quantize(prefix, block)
            trim()  # the block's unquantised copy and bitsandbytes' temporaries back to the system, not kept by
            # glibc for reuse: without it the host RSS grew by 1.5 GB more than the weights over 6 FLUX blocks
    rest = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if rest:
        load("", rest)
    buffers = {n: sources[n] for n, _ in model.named_buffers() if n in sources}  # SD3's positional table
    for name, t in files.read(buffers, dtype).items():
        mod_name, _, attr = name.rpartition(".")
        (model.get_submodule(mod_name) if mod_name else model)._buffers[attr] = t
    return model.eval()
