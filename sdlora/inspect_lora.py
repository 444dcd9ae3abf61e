"""`sdlora inspect`: what a LoRA file holds, whoever wrote it (kohya, OneTrainer, ai-toolkit, diffusers, PEFT)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from sdlora import archs
from sdlora.formats import convert, embeddings, kohya
from sdlora.formats.read import read_adapter


def module_kind(component: str, path: str) -> str:
    """A module's group: its path with block/layer indices folded (`attn2.to_q`, `resnets.conv1`, \
`self_attn.q_proj`)."""
    if component in kohya.TE_COMPONENTS:
        return re.sub(r"^encoder\.(layers|block)\.\d+\.", "", path)
    # SD 3.x / FLUX.1 original paths: `joint_blocks.3.x_block.attn.qkv` -> `x_block.attn.qkv`,
    # `double_blocks.0.img_attn.qkv` -> `double.img_attn.qkv`, `single_blocks.7.linear1` -> `single.linear1`
    path = re.sub(r"^joint_blocks\.\d+\.", "", path)
    path = re.sub(r"^(double|single)_blocks\.\d+\.", r"\1.", path)
    path = re.sub(r"^(down_blocks|up_blocks)\.\d+\.|^mid_block\.", "", path)
    path = re.sub(r"^(attentions|resnets|downsamplers|upsamplers)\.\d+\.", r"\1.", path)
    return re.sub(r"transformer_blocks\.\d+\.", "", path)


def _fmt(values) -> str:
    vals = sorted(set(values))
    return ",".join(f"{v:g}" for v in vals)


def describe(path) -> dict:
    """Everything `sdlora inspect` prints, as a dict."""
    path = Path(path)
    adapter = read_adapter(path)
    arch = adapter.arch or next(iter(archs.SPECS))
    placed, unknown = convert.resolve(adapter, arch)
    metadata = adapter.metadata
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    groups: dict[tuple[str, str], list] = {}
    params = sum(m.numel() for m in adapter.modules.values())
    for where, m in placed.values():
        groups.setdefault((where.component, module_kind(where.component, where.path)), []).append(
            (m.rank, m.alpha, m.scale, m.kind + ("+tucker" if {"mid", "t1", "t2"} & set(m.tensors) else "")))
    rows = []
    for (comp, kind), items in sorted(groups.items()):
        ranks = [r for r, _, _, _ in items]
        alphas = [a for _, a, _, _ in items if a is not None]
        scales = [s for _, _, s, _ in items]
        rows.append({"component": comp, "group": kind, "kind": ",".join(sorted({k for *_, k in items})),
                     "modules": len(items), "rank": _fmt(ranks),
                     "alpha": _fmt(alphas) + ("" if len(alphas) == len(items) else " (some missing: = rank)")
                     if alphas else "missing (= rank)", "scale": _fmt(scales)})
    trigger = metadata.get("modelspec.trigger_phrase", "")
    tags = Counter()
    try:
        for folder in json.loads(metadata.get("ss_tag_frequency", "{}") or "{}").values():
            tags.update(folder)
    except (ValueError, AttributeError):
        pass
    return {"file": str(path), "format": adapter.source, "size_bytes": size, "arch": arch,
            "modules": len(adapter.modules),
            "parameters": params, "groups": rows, "trigger": trigger, "top_tags": tags.most_common(10),
            "skipped": adapter.unknown, "unknown": unknown, "metadata": metadata,
            "base_model_version": metadata.get("ss_base_model_version", ""),
            "embeddings": {n: {c: list(t.shape) for c, t in v.items()} for n, v in adapter.embeddings.items()},
            "embeddings_text": embeddings.describe(adapter.embeddings)}


def format_description(d: dict) -> str:
    lines = [f"{d['file']}", f"  format        {d['format']}, {d['size_bytes']:,} bytes",
             f"  architecture  {archs.label(d['arch'])}"
             + (f" (ss_base_model_version {d['base_model_version']})" if d["base_model_version"] else ""),
             f"  modules       {d['modules']} ({d['parameters']:,} LoRA parameters)",
             f"  trigger       {d['trigger'] or '(none in metadata)'}"]
    for e in d["embeddings_text"]:
        lines.append(f"  embedding     {e} (bundle_emb: the trigger's learnt tokens)")
    if d["top_tags"]:
        lines.append("  top tags      " + ", ".join(f"{t} ({n})" for t, n in d["top_tags"]))
    if d["skipped"] or d["unknown"]:
        lines.append(f"  not LoRA      {len(d['skipped'])} skipped keys, {len(d['unknown'])} unknown modules")
    lines.append("  targets (component / group: kind, modules, rank, alpha, effective scale alpha/rank)")
    for r in d["groups"]:
        lines.append(f"    {r['component']:4s} {r['group']:32s} {r['kind']:6s} {r['modules']:4d}  "
                     f"rank {r['rank']:6s} alpha {r['alpha']:8s} scale {r['scale']}")
    lines.append("  metadata")
    for k in sorted(d["metadata"]):
        v = d["metadata"][k]
        v = v if len(v) <= 120 else v[:117] + "..."
        lines.append(f"    {k} = {v}")
    return "\n".join(lines)


def add_inspect_args(p) -> None:
    p.add_argument("file", help="LoRA .safetensors (kohya, OneTrainer, ai-toolkit, diffusers, PEFT) or a PEFT folder")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_inspect(args) -> int:
    d = describe(args.file)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0
