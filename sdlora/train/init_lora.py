"""`--init-lora FILE|FOLDER`: start training from an existing adapter (kohya's `--network_weights`).

The file is read by sdlora's one reader (`formats.read.read_adapter`: kohya, diffusers, PEFT, LyCORIS), early
(`read`, before the model loads), and set into the freshly added layers after they exist (`apply`): each module is
placed by its kohya name on the model being trained (`layouts.model_table`, aliases included; SD 3.x / FLUX.1 fused
q/k/v modules split back onto their parts by `convert.split_parts`), must be of the kind and shapes (rank) the run
trains, and is loaded by its kind (`KindSpec.load`), its alpha/rank folded in so its ΔW is exactly the file's.
An adapter for another family, another kind or rank, or with modules this run does not train, is refused in one line.
Its lineage (file name and sha256 of its bytes) goes into the metadata (`lineage`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from sdlora.errors import SdloraError


def read(cfg):
    """The --init-lora adapter (an AdapterFile), or None; refused in one line when unreadable."""
    if not cfg.init_lora:
        return None
    from sdlora.formats.read import read_adapter

    path = Path(cfg.init_lora)
    if not path.exists():
        raise SdloraError(f"--init-lora {cfg.init_lora}: no such file or folder; pass an adapter sdlora reads "
                          "(a .safetensors file or a PEFT folder)")
    return read_adapter(path)


@functools.lru_cache(maxsize=8)
def _digest(path: str, mtime: float, size: int) -> str:
    h = hashlib.sha256()
    p = Path(path)
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def lineage(cfg) -> tuple[str, str] | None:
    """(file or folder name, sha256 of its bytes; of every file in a folder, in name order) of --init-lora."""
    if not cfg.init_lora:
        return None
    p = Path(cfg.init_lora)
    st = p.stat()
    return p.name, _digest(str(p.resolve()), st.st_mtime, st.st_size)


def _placed(adapter, components: dict, arch: str) -> dict[tuple[str, str], object]:
    """{(component, module name in the model): AdapterModule} of the file, on the model being trained."""
    from sdlora.formats import layouts
    from sdlora.formats.convert import split_parts

    table = layouts.model_table(components, arch)
    out, foreign = {}, []
    for name, m in adapter.modules.items():
        where = table.get(name)
        if where is None:
            foreign.append(name)
        elif where.parts:  # a fused original module (SD 3.x / FLUX.1 q/k/v): one LoRA per part
            out |= {(where.component, p): part for p, part in split_parts(where, m).items()}
        else:
            out[(where.component, where.module_path)] = m
    if foreign:
        raise SdloraError(f"--init-lora {adapter.file_name}: {len(foreign)} of its modules name no layer of this "
                          f"model (e.g. {foreign[0]}); it is for another model")
    return out


@torch.no_grad()
def apply(cfg, model, lora, say) -> None:
    """Set the run's LoRA layers (`lora.adapted`: {component: module}) to --init-lora's weights (nothing without)."""
    from sdlora import archs
    from sdlora.lora import kinds

    adapter = read(cfg)
    if adapter is None:
        return
    base, name = model.base, adapter.file_name
    if not archs.fits(adapter.arch, base.arch):
        raise SdloraError(f"--init-lora {name} is an adapter for {archs.label(adapter.arch)}, this model is "
                          f"{archs.label(base.arch)} ({base.name}); continue from an adapter of the same family")
    placed = _placed(adapter, base.components, base.arch)
    layers = {(c, n): v for c, m in lora.adapted.items() for n, v in kinds.adapter_layers(m).items()}
    untrained = [k for k in placed if k not in layers]
    if untrained:
        c, n = untrained[0]
        raise SdloraError(f"--init-lora {name}: {len(untrained)} of its modules are not trained by this run (e.g. "
                          f"{c} {n}); use the --preset, --network and text-encoder settings it was trained with")
    for key, m in placed.items():
        spec, layer = layers[key]
        kind, mine, alpha = spec.collect(layer)
        shapes = {r: tuple(t.shape) for r, t in m.tensors.items()}
        if m.kind != kind or shapes != {r: tuple(t.shape) for r, t in mine.items()}:
            what = (f"a {m.kind} module" if m.kind != kind else f"rank {m.rank}") + f", this run trains {kind}"
            raise SdloraError(f"--init-lora {name}: {key[0]} {key[1]} is {what} at rank "
                              f"{kinds.get(kind).rank(mine) or '-'}; train with the --network, --rank and "
                              "--conv-rank it was trained with")
        spec.load(layer, m.tensors, m.scale / kinds.get(kind).scale(alpha, mine))
    missing = len(layers) - len(placed)
    say(f"--init-lora {name}: {len(placed)} modules loaded" + (f"; {missing} layers it lacks start fresh"
                                                                 if missing else ""))
