"""Attach adapter layers (LoRA, LoCon, LoHa, LoKr, DoRA) and report what was adapted.

PEFT's `inject_adapter_in_model` is used for both the UNet and the CLIP text encoder. (transformers 5.x's
`CLIPTextModel.add_adapter` refuses to run with PEFT 0.21, the newest on PyPI; PEFT's own injection works.)

Which implementation per kind, and why (shared/LYCORIS_AND_DIT_FORMATS.md):
- lora / locon: PEFT `LoraConfig`; a kxk conv gets lora_A = Conv2d(in, r, k) and lora_B = Conv2d(r, out, 1), exactly
  LyCORIS/kohya's LoCon pair (down [r, in, k, k], up [out, r, 1, 1]) with scale alpha/r.
- loha: PEFT `LoHaConfig` uses LyCORIS's parameter names, shapes and scale alpha/r (P `loha/layer.py`), so the
  trained tensors are written as they are (plain form: w*_b [r, in·kh·kw] for convs).
- lokr: PEFT `LoKrConfig`: same factorisation (`factorization`), same kron order (W1 left) and shapes as LyCORIS;
  one difference: with both factors full PEFT still scales by alpha/r where every loader uses 1, so that scale is
  folded into W1 when collecting and alpha is written = r (what LyCORIS writes there).
- dora: PEFT's DoRA keeps one magnitude per *output* channel, which A1111 misapplies and ComfyUI applies with the
  base weight's norm (spec §4.2); the orientation both read correctly is per *input* channel, DoRA scale
  [1, in(, 1, 1)] (spec §4.4), which only LyCORIS trains: its `LoConModule(weight_decompose=True, wd_on_out=False)`
  (the `lycoris-lora` package, the format's reference implementation) is used for DoRA.
"""

from __future__ import annotations

import json
import re
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
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer
finally:
    if _HIDE_BNB:
        del sys.modules["bitsandbytes"]

from sdlora.errors import SdloraError
from sdlora.formats import kohya
from sdlora.lora.targets import conv_targets

ADAPTER = "default"
NETWORKS = ("lora", "locon", "loha", "lokr")
DORA_ATTR = "sdlora_dora"  # the LyCORIS DoRA module's attribute on the layer it adapts


@dataclass(frozen=True)
class Network:
    """What is trained: `kind` (NETWORKS), DoRA on top (lora/locon), the rank/alpha of the kxk convs LoCon, LoHa and
    LoKr add (None: the linear rank/alpha, LyCORIS's default), LoKr's factor (-1: the most square split)."""

    kind: str = "lora"
    dora: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    factor: int = -1

    @property
    def convs(self) -> bool:
        """Does it adapt the UNet's kxk convolutions (ResNet blocks, down/up-samplers)? LyCORIS's kinds do by default,
        kohya's plain LoRA only when a conv rank is given."""
        return self.kind != "lora" or self.conv_rank is not None


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
    names = list(targets) + convs
    targets = list(targets)
    pattern = "^(" + "|".join(re.escape(t) for t in names) + ")$"
    conv_rank = net.conv_rank or rank
    conv_alpha = net.conv_alpha if net.conv_alpha is not None else (alpha if net.conv_rank is None else conv_rank)
    kxk = [c for c in convs if model.get_submodule(c).kernel_size != (1, 1)]  # 1x1 convs: the linear rank
    ranks = {re.escape(c): conv_rank for c in kxk}
    alphas = {re.escape(c): conv_alpha for c in kxk}
    if net.dora:
        _add_dora(model, targets + convs, kxk, rank, alpha, conv_rank, conv_alpha)
    else:
        kw = dict(target_modules=pattern, rank_pattern=ranks, alpha_pattern=alphas)
        if net.kind in ("lora", "locon"):
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, lora_dropout=0.0, **kw)
        elif net.kind == "loha":
            config = LoHaConfig(r=rank, alpha=alpha, init_weights=True, use_effective_conv2d=False, **kw)
        elif net.kind == "lokr":
            config = LoKrConfig(r=rank, alpha=alpha, init_weights=True, use_effective_conv2d=False,
                                decompose_factor=net.factor, **kw)
        else:
            raise SdloraError(f"--network {net.kind}: use one of {', '.join(NETWORKS)}")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in model.parameters():
        p.requires_grad_(id(p) not in before)


def _add_dora(model, names, kxk, rank, alpha, conv_rank, conv_alpha) -> None:
    try:
        from lycoris.modules.locon import LoConModule
    except ImportError as e:
        raise SdloraError("--dora trains with LyCORIS's DoRA (a per-input-channel DoRA scale, what A1111 and ComfyUI "
                          "read): pip install lycoris-lora") from e
    for name in names:
        layer = model.get_submodule(name)
        r, a = (conv_rank, conv_alpha) if name in kxk else (rank, alpha)
        m = LoConModule(name, layer, multiplier=1.0, lora_dim=r, alpha=a, weight_decompose=True, wd_on_out=False)
        m.apply_to()
        layer.add_module(DORA_ATTR, m)  # its parameters become the model's (optimizer, checkpoints, .to())


def _dora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: getattr(m, DORA_ATTR) for name, m in model.named_modules() if hasattr(m, DORA_ATTR)}


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapter wrappers of `model` (PEFT LoRA/LoHa/LoKr layers, LyCORIS DoRA modules), by the name of the module
    they wrap."""
    out = {name: m for name, m in model.named_modules()
           if (isinstance(m, LoraLayer) and ADAPTER in m.lora_A) or (isinstance(m, LoHaLayer) and ADAPTER in m.hada_w1_a)
           or (isinstance(m, LoKrLayer) and ADAPTER in m.lokr_w1_a | m.lokr_w1)}
    return out | _dora_modules(model)


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
    expected = 0
    layers = lora_layers(model)
    for layer in layers.values():
        if not isinstance(layer, LoraLayer):  # LoHa, LoKr, DoRA: their own parameter counts
            expected += sum(p.numel() for p in layer.parameters() if p.requires_grad)
            continue
        base = layer.get_base_layer()
        d_in, d_out = (base.in_features, base.out_features) if isinstance(base, torch.nn.Linear) else (
            base.in_channels, base.out_channels)
        k = 1 if isinstance(base, torch.nn.Linear) else base.kernel_size[0] * base.kernel_size[1]
        expected += layer.r[ADAPTER] * (d_in * k + d_out)
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
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _roles(pdicts: dict[str, torch.nn.ParameterDict]) -> dict[str, torch.Tensor]:
    return {role: d[ADAPTER].detach().float().clone() for role, d in pdicts.items() if ADAPTER in d}


def collect_modules(model: torch.nn.Module) -> dict[str, tuple[str, dict[str, torch.Tensor], float]]:
    """{module name: (kind, tensors by role in the LyCORIS layout, alpha)} of every trained adapter layer, detached,
    fp32 (roles: `sdlora.formats.adapter`)."""
    out = {}
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoraLayer):
            down = layer.lora_A[ADAPTER].weight.detach().float().clone()
            up = layer.lora_B[ADAPTER].weight.detach().float().clone()
            kind = "locon" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else "lora"
            out[name] = (kind, {"down": down, "up": up}, float(layer.lora_alpha[ADAPTER]))
        elif isinstance(layer, LoHaLayer):
            t = _roles({"w1a": layer.hada_w1_a, "w1b": layer.hada_w1_b, "w2a": layer.hada_w2_a,
                        "w2b": layer.hada_w2_b, "t1": layer.hada_t1, "t2": layer.hada_t2})
            out[name] = ("loha", t, float(layer.alpha[ADAPTER]))
        elif isinstance(layer, LoKrLayer):
            t = _roles({"w1": layer.lokr_w1, "w1a": layer.lokr_w1_a, "w1b": layer.lokr_w1_b, "w2": layer.lokr_w2,
                        "w2a": layer.lokr_w2_a, "w2b": layer.lokr_w2_b, "t2": layer.lokr_t2})
            alpha, r = float(layer.alpha[ADAPTER]), layer.r[ADAPTER]
            if "w1" in t and "w2" in t:  # loaders use scale 1 here: fold PEFT's alpha/r into W1, write alpha = r
                t["w1"] = t["w1"] * (alpha / r)
                alpha = float(r)
            out[name] = ("lokr", t, alpha)
        else:  # LyCORIS DoRA LoConModule: its kohya-layout state dict (lora_up already times its scalar) by role
            sd = layer.custom_state_dict()
            t = {k: v.detach().float().clone() for k, v in kohya.roles_of("dora", sd).items()}
            out[name] = ("dora", t, float(sd["alpha"]))
    return out


def network_metadata(cfg, md: dict[str, str], module: str = "networks.lora") -> dict[str, str]:
    """`ss_network_module` / `ss_network_args` as kohya writes them when LyCORIS is the network module
    (LYCORIS_AND_DIT_FORMATS.md §6: `lycoris.kohya`, every argument a string, `algo` telling the kinds apart);
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
    if net.kind == "lora" and not net.dora:
        return {"ss_network_module": module, "ss_network_args": json.dumps(args)}
    args["algo"] = "locon" if net.kind == "lora" else net.kind
    if net.kind == "lokr":
        args["factor"] = str(net.factor)
    if net.dora:
        args["dora_wd"] = "True"
        args["wd_on_output"] = "False"
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
