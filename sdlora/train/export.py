"""The adapter a run writes: its metadata (`formats.meta` from the run's settings, data and counts), the kohya/LyCORIS
file written atomically (or rescued elsewhere when the disk is full), checked as ComfyUI, A1111, kohya and diffusers
will read it, with the check's report; and the run table's rows, counting the modules that file holds."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch

from sdlora import outputs
from sdlora.config import TrainConfig
from sdlora.data.captions import tag_frequency
from sdlora.errors import SdloraError
from sdlora.formats import embeddings as emb
from sdlora.formats import kohya, layouts, meta
from sdlora.formats.read import parse
from sdlora.formats.verify import verify
from sdlora.lora.inject import collect_modules, network_metadata, report
from sdlora.lora.targets import preset_targets
from sdlora.train import DTYPES, init_lora
from sdlora.train.prepare import Examples, Model


def file_row(module, component: str, base):
    """The run table's row of `component`, counting the modules its file holds (what `write_adapter` writes:
    SD3/FLUX fuse the q/k/v LoRAs of an attention into one module, as kohya names them)."""
    r = report(module, component)
    layers = {component: collect_modules(module)}
    r.written = len(kohya.from_trained(layers, base.arch, layouts.originals(base)).modules)
    return r


def save_adapter(path: Path, cfg: TrainConfig, model: Model, data: Examples, targets: dict, *, steps: int,
                 started: datetime, unwrap, say, log, tokens=None, extra: dict | None = None) -> Path:
    """Write the adapter of `steps` trained steps to `path`, with the run's metadata. `say`: the run's log; `log`:
    where the saved file and its check are said (quiet for a checkpoint's copy). `tokens`: the new tokens of
    --pivotal (`lora.tokens.Attached`), bundled in the file and written beside it as an embedding file."""
    base = model.base
    layers = {c: collect_modules(unwrap(m)) for c, m in base.components.items() if c in targets}
    stats = meta.RunStats(
        spec=base.spec, base_model_version=base.base_model_version, variant=base.variant, model_name=base.name,
        targets={c: preset_targets(cfg.preset, c, base.spec)[0] for c in targets},
        resolution=model.resolution, steps=steps, num_images=len(data.instance) * cfg.repeats,
        num_reg_images=len(data.classes), tag_frequency={Path(cfg.images).name: tag_frequency(
            [e.caption for e in data.instance])}, started=started)
    with outputs.finish_before_interrupt(say, f"adapter {path} ({steps} steps)"):
        md = meta.build(cfg, stats) | meta.dataset_metadata(data.dataset, cfg.repeats, data.instance, data.classes,
                                                            cfg.trigger_text)
        md |= network_metadata(cfg, md, base.spec.kohya_network_module)
        md |= meta.controls_metadata(cfg, init_lora.lineage(cfg)) | (extra or {})
        return write_adapter(layers, DTYPES[cfg.save_precision], md, base, path, log, rescue=path == cfg.output_path,
                             embeddings=tokens.vectors() if tokens else None)


def write_adapter(layers: dict, dtype: torch.dtype, md: dict, base, path: Path, say, rescue: bool,
                  embeddings: dict | None = None) -> Path:
    """Write trained `layers` ({component: lora.inject.collect_modules(...)}) as a kohya/LyCORIS file with metadata
    `md`, verified as readers will read it. `rescue`: the run's result, which a full disk saves elsewhere rather than
    losing (and, with `embeddings` ({name: {component: vectors}}, --pivotal), whose embedding files are written
    beside it)."""
    adapter = kohya.from_trained(layers, base.arch, layouts.originals(base))
    tensors = kohya.to_tensors(adapter, dtype) | emb.to_bundle({n: {c: t.to(dtype) for c, t in v.items()}
                                                                for n, v in (embeddings or {}).items()})
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        raise SdloraError("the adapter holds NaN/Inf values; nothing was saved. Lower --lr or use bf16/no precision")
    # Check the file as ComfyUI, A1111, kohya and diffusers will read it. It is written either way (a failed check
    # must not lose the training), but a problem fails the run loudly.
    report_ = verify(parse(tensors, md, where=str(path)), model=base, path=str(path))
    if rescue:
        path = outputs.save_or_rescue(lambda p: kohya.save(tensors, p, md), path)
    else:  # inside a checkpoint folder: its writer handles failures
        path = kohya.save(tensors, path, md)
    say(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, {len(adapter.modules)} modules, {len(tensors)} tensors)")
    for line in report_.lines()[1:-1]:
        say(line)
    if rescue and embeddings:
        for name, vecs in embeddings.items():
            side = emb.save_file(vecs, emb.file_path(path, name), md)
            say(f"embedding {side} (A1111/ComfyUI embeddings folder: type '{name}' / 'embedding:{name}'; "
                f"diffusers: load_textual_inversion with token='{name}')")
    if not report_.ok:
        raise SdloraError(f"{path} was saved but does not verify: {report_.problems[0]} (run `sdlora verify {path}`)")
    return path
