"""Attach adapter layers (LoRA, LoCon, LoHa, LoKr, DoRA) and report what was adapted.

PEFT's `inject_adapter_in_model` is used for both the UNet and the CLIP text encoder. (transformers 5.x's
`CLIPTextModel.add_adapter` refuses to run with PEFT 0.21, the newest on PyPI; PEFT's own injection works.)
Which implementation each kind trains with, and why, is its module's (`sdlora/lora/kinds/`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

# peft imports bitsandbytes whenever it is installed (for its own LoRA classes over bitsandbytes layers): ~1-2 s
# more per start and a warning about missing CPU kernels. Hidden while peft loads (peft caches "not available");
# `--optimizer adamw8bit` and --base-precision int8/nf4 import it afterwards (sdlora/lazy.py). peft then wraps a
# bitsandbytes Linear8bitLt/Linear4bit (nn.Linear subclasses) in its plain `lora.Linear`, whose forward calls the
# quantised layer and adds the LoRA path: what its bitsandbytes classes do in training (they add merging).
_HIDE_BNB = "bitsandbytes" not in sys.modules and "peft" not in sys.modules
if _HIDE_BNB:
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # Python's own "not importable" mark
try:
    import peft.tuners.loha  # noqa: F401  (the layers sdlora/lora/kinds/ train with)
    import peft.tuners.lokr  # noqa: F401
    import peft.tuners.lora  # noqa: F401
finally:
    if _HIDE_BNB:
        del sys.modules["bitsandbytes"]

# kept below the peft block above, as before: peft loads first, while bitsandbytes is hidden
from sdlora.lora import kinds  # noqa: E402
from sdlora.lora.targets import conv_targets  # noqa: E402


@dataclass(frozen=True)
class Network:
    """What is trained: `kind` (`kinds.NETWORKS`), DoRA on top (`kinds.DORA_BASES`), the rank/alpha of the kxk convs
    LoCon, LoHa and LoKr add (None: the linear rank/alpha, LyCORIS's default), LoKr's factor (-1: the most square
    split)."""

    kind: str = kinds.LORA.name
    dora: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    factor: int = -1

    @property
    def convs(self) -> bool:
        """Does it adapt the UNet's kxk convolutions (ResNet blocks, down/up-samplers)? LyCORIS's kinds do by default,
        kohya's plain LoRA only when a conv rank is given."""
        return kinds.trained(self.kind).convs or self.conv_rank is not None


def network_of(cfg) -> Network:
    return Network(cfg.network, cfg.dora, cfg.conv_rank, cfg.conv_alpha, cfg.lokr_factor)


def add_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, net: Network | None = None) -> None:
    """Wrap exactly the modules named in `targets` (plus the kxk convs when `net.convs`) with the `net` adapter,
    initialised so the model's output is unchanged (LoRA B = 0, LoHa w2b = 0, LoKr W1 = 0, DoRA magnitude = ‖W‖)."""
    net = net or Network()
    convs = [c for c in conv_targets(model) if c not in targets] if net.convs else []
    if not targets and not convs:
        return
    before = {id(p) for p in model.parameters()}
    conv_rank = net.conv_rank or rank
    conv_alpha = net.conv_alpha if net.conv_alpha is not None else (alpha if net.conv_rank is None else conv_rank)
    kxk = [c for c in convs if model.get_submodule(c).kernel_size != (1, 1)]  # 1x1 convs: the linear rank
    where = kinds.Placement(list(targets) + convs, kxk, rank, alpha, conv_rank, conv_alpha)
    kinds.built(net).inject(model, where, net)
    for p in model.parameters():
        p.requires_grad_(id(p) not in before)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapter wrappers of `model` (PEFT LoRA/LoHa/LoKr layers, LyCORIS DoRA modules), by the name of the module
    they wrap."""
    return {name: layer for name, (_, layer) in kinds.adapter_layers(model).items()}


@dataclass
class ComponentReport:
    component: str
    modules: int
    trainable: int  # parameters with requires_grad
    expected: int  # sum of r * (d_in·k·k + d_out) over adapted LoRA modules, the parameters of other kinds
    frozen: int
    written: int | None = None  # modules the file holds, where they differ (SD3/FLUX: q/k/v LoRAs fused into one)


def report(model: torch.nn.Module, component: str) -> ComponentReport:
    """Count adapted modules and parameters; `expected` is Σ r·(d_in + d_out) computed from the base layers."""
    layers = kinds.adapter_layers(model)
    expected = sum(spec.trainable_count(layer) for spec, layer in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return ComponentReport(component, len(layers), trainable, expected, frozen)


def format_table(reports: list[ComponentReport]) -> str:
    """The table printed at the start of training."""
    rows = [("component", "modules in the file", "trainable params", "Σ r(d_in+d_out)", "frozen params")]

    def count(r) -> int:
        return r.modules if r.written is None else r.written

    for r in reports:
        fused = f" ({r.modules} layers trained)" if count(r) != r.modules else ""
        rows.append((r.component, f"{count(r)}{fused}", f"{r.trainable:,}", f"{r.expected:,}", f"{r.frozen:,}"))
    total_t = sum(r.trainable for r in reports)
    rows.append(("total", str(sum(count(r) for r in reports)), f"{total_t:,}",
                 f"{sum(r.expected for r in reports):,}", f"{sum(r.frozen for r in reports):,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def collect_modules(model: torch.nn.Module) -> dict[str, tuple[str, dict[str, torch.Tensor], float]]:
    """{module name: (kind, tensors by role in the LyCORIS layout, alpha)} of every trained adapter layer, detached,
    fp32 (roles: `sdlora.formats.adapter`)."""
    return {name: spec.collect(layer) for name, (spec, layer) in kinds.adapter_layers(model).items()}


def network_metadata(cfg, md: dict[str, str], module: str = "networks.lora") -> dict[str, str]:
    """`ss_network_module` / `ss_network_args` as kohya writes them when LyCORIS is the network module
    (docs/lycoris-and-dit.md §6: `lycoris.kohya`, every argument a string, `algo` telling the kinds apart);
    plain LoRA stays `module` (the family's: `networks.lora`, `networks.lora_sd3`, `networks.lora_flux`; with
    `conv_dim`/`conv_alpha` when convs are trained). `md` is the metadata built so far (its `ss_network_args` are
    kept)."""
    net = network_of(cfg)
    try:
        args = json.loads(md.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    if net.convs:
        args["conv_dim"] = str(net.conv_rank or cfg.rank)
        args["conv_alpha"] = str(net.conv_alpha if net.conv_alpha is not None else
                                 (cfg.network_alpha if net.conv_rank is None else net.conv_rank))
    lycoris = kinds.lycoris_args(net)
    if lycoris is None:
        return {"ss_network_module": module, "ss_network_args": json.dumps(args)}
    args.update(lycoris)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
