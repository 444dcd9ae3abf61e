"""Attach LoRA layers with PEFT's public API and report what was adapted.

PEFT's `inject_adapter_in_model` is used for both the UNet and the CLIP text encoder. (transformers 5.x's
`CLIPTextModel.add_adapter` refuses to run with PEFT 0.21, the newest on PyPI; PEFT's own injection works.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sys

import torch

# peft imports bitsandbytes whenever it is installed (for quantised base layers, which sdlora does not use): ~1-2 s
# more per start and a warning about missing CPU kernels. Hidden while peft loads (peft caches "not available");
# `--optimizer adamw8bit` imports it afterwards as usual.
_HIDE_BNB = "bitsandbytes" not in sys.modules and "peft" not in sys.modules
if _HIDE_BNB:
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # Python's own "not importable" mark
try:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
finally:
    if _HIDE_BNB:
        del sys.modules["bitsandbytes"]

ADAPTER = "default"


def add_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float) -> None:
    """Wrap exactly the modules named in `targets` with LoRA (B = 0, so the model's output is unchanged)."""
    if not targets:
        return
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, init_lora_weights=True, lora_dropout=0.0)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The PEFT LoRA wrappers of `model`, by the name of the module they wrap."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


@dataclass
class ComponentReport:
    component: str
    modules: int
    trainable: int  # parameters with requires_grad
    expected: int  # sum of r * (d_in + d_out) over adapted modules
    frozen: int


def report(model: torch.nn.Module, component: str) -> ComponentReport:
    """Count adapted modules and parameters; `expected` is Σ r·(d_in + d_out) computed from the base layers."""
    expected = 0
    layers = lora_layers(model)
    for layer in layers.values():
        base = layer.get_base_layer()
        d_in, d_out = (base.in_features, base.out_features) if isinstance(base, torch.nn.Linear) else (
            base.in_channels, base.out_channels)
        expected += layer.r[ADAPTER] * (d_in + d_out)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return ComponentReport(component, len(layers), trainable, expected, frozen)


def format_table(reports: list[ComponentReport]) -> str:
    """The table printed at the start of training."""
    rows = [("component", "modules", "trainable params", "Σ r(d_in+d_out)", "frozen params")]
    for r in reports:
        rows.append((r.component, str(r.modules), f"{r.trainable:,}", f"{r.expected:,}", f"{r.frozen:,}"))
    total_t = sum(r.trainable for r in reports)
    rows.append(("total", str(sum(r.modules for r in reports)), f"{total_t:,}",
                 f"{sum(r.expected for r in reports):,}", f"{sum(r.frozen for r in reports):,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def collect(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """{module name: (down [r, in], up [out, r], alpha, is_conv)} of every LoRA layer, detached, in fp32."""
    out = {}
    for name, layer in lora_layers(model).items():
        down = layer.lora_A[ADAPTER].weight.detach().float()
        up = layer.lora_B[ADAPTER].weight.detach().float()
        is_conv = isinstance(layer.get_base_layer(), torch.nn.Conv2d)
        out[name] = (down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), float(layer.lora_alpha[ADAPTER]), is_conv)
    return out
