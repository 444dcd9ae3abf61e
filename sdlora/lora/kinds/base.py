"""What every adapter kind is: a `KindSpec` record (the one type `sdlora.lora.kinds` registers), the scale alpha/r
and the Tucker product several kinds share.

W = W0 + scale · ΔW with scale = alpha / rank (alpha missing or 0: scale 1, as kohya, ComfyUI and A1111 read it).
Tensors are passed by role ("down", "w1a", ...), never by key name: the key suffix of each role is
`sdlora/formats/kohya.py`'s (`ROLE_SUFFIX`, keyed by these records).

Importing this package imports neither torch, peft nor LyCORIS (TrainConfig takes `--network`'s choices from it, and
`sdlora --help` must stay fast): the tensor maths import torch where they run, and peft is loaded by
`sdlora.lora.inject` (with bitsandbytes hidden) before a kind injects or collects layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


ADAPTER = "default"  # the PEFT adapter name of the layers sdlora trains


def lora_scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha else float(alpha) / rank


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """R[o, i, y, x] = Σ_{p,q} t[p, q, y, x] · wa[p, o] · wb[q, i] (LyCORIS `rebuild_tucker`, PEFT `make_weight_cp`)."""
    import torch

    return torch.einsum("pqyx,po,qi->oiyx", t.float(), wa.float(), wb.float())


def peft_roles(pdicts: dict[str, torch.nn.ParameterDict]) -> dict[str, torch.Tensor]:
    """{role: PEFT parameter dict} of a trained layer -> {role: its adapter's tensor, detached fp32} (roles it has)."""
    return {role: d[ADAPTER].detach().float().clone() for role, d in pdicts.items() if ADAPTER in d}


@dataclass(frozen=True)
class Placement:
    """Where and at what rank a kind's layers go: `names` (the targets, then the convs), of which `kxk` are kxk convs
    (conv rank/alpha; 1x1 convs take the linear ones)."""

    names: list[str]
    kxk: list[str]
    rank: int
    alpha: float
    conv_rank: int
    conv_alpha: float

    def rank_alpha(self, name: str) -> tuple[int, float]:
        return (self.conv_rank, self.conv_alpha) if name in self.kxk else (self.rank, self.alpha)

    def peft_patterns(self) -> dict:
        """PEFT's `target_modules` / `rank_pattern` / `alpha_pattern` for these modules, exactly."""
        pattern = "^(" + "|".join(re.escape(t) for t in self.names) + ")$"
        return dict(target_modules=pattern, rank_pattern={re.escape(c): self.conv_rank for c in self.kxk},
                    alpha_pattern={re.escape(c): self.conv_alpha for c in self.kxk})


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, a key of formats/kohya.py's ROLE_SUFFIX
class KindSpec:
    """One adapter kind: its roles and ΔW (the file side), how it is trained (the training side, for the kinds
    `--network` offers) and what kohya's metadata says of it. Subclasses (one per kind module) override the maths."""

    name: str  # what `AdapterModule.kind` and `--network` say
    help: str = ""  # its words in `--network`'s help; "" when training cannot produce it from `--network`
    roles: tuple[str, ...] = ()  # roles a module of this kind must hold
    pair: bool = False  # a down/up pair (+ mid for Tucker): kohya's own layout, what diffusers and PEFT files hold
    plain_pair: bool = False  # a pair and nothing more (no DoRA scale): SVD-resizable, writable as lora_A/lora_B
    flat_conv: bool = False  # a conv's factors may be 2-D, ΔW [out, in·kh·kw] (LoHa, LoKr without Tucker)
    has_alpha: bool = True  # its file carries an alpha (a full diff has none)
    trainable: bool = False  # a `--network` choice
    convs: bool = False  # trained, it adapts the UNet's kxk convs by default (LyCORIS's kinds; plain LoRA only
    # when a conv rank is given)
    takes_dora: bool = False  # `--dora` applies to it
    kohya_module: bool = False  # trained, kohya's own network module writes it (`networks.lora`), not LyCORIS's
    algo: str = ""  # LyCORIS's `algo` network argument for it

    # --- the file side: roles -> rank, scale, shape, ΔW

    def rank(self, t: dict[str, torch.Tensor]) -> int | None:
        """The r of alpha/r; None when the kind has none (scale 1, rank bound min(out, in))."""
        return None

    def scale(self, alpha: float | None, t: dict[str, torch.Tensor]) -> float:
        """The factor every loader applies to ΔW: alpha/r, 1 where the kind has no rank."""
        r = self.rank(t)
        return 1.0 if r is None else lora_scale(alpha, r)

    def shape(self, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """Shape of the base weight a module adapts (2-D [out, in·kh·kw] for a `flat_conv` conv)."""
        raise NotImplementedError

    def delta(self, t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
        """scale·ΔW without DoRA, fp32, in the shape the kind's formula gives."""
        raise NotImplementedError

    def missing(self, t: dict[str, torch.Tensor]) -> list[str]:
        """The roles a module lacks (as the error names them)."""
        return [r for r in self.roles if r not in t]

    def problem(self, t: dict[str, torch.Tensor], alpha: float | None) -> str | None:
        """Why no loader can apply a module with these tensors (after `missing`), None when it is sound. By default:
        the factors' inner dimensions and shapes must fit together (checked on the meta device)."""
        try:
            d = self.delta({k: v.to("meta") for k, v in t.items()}, alpha)
        except (RuntimeError, IndexError, KeyError) as e:
            return f"has {self.name} factors whose shapes do not fit together ({str(e).splitlines()[0][:80]})"
        if math.prod(d.shape) != math.prod(self.shape(t)):
            return f"has {self.name} factors whose shapes do not fit together"
        return None

    # --- the training side (kinds with `trainable` or `takes_dora`'s DoRA)

    def inject(self, model: torch.nn.Module, where: Placement, net) -> None:
        """Wrap the modules `where` names with this kind's layers, initialised so the output is unchanged."""
        raise NotImplementedError(f"{self.name} is not trained by sdlora")

    def layer_of(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """The trained layer of this kind that `module` is (or holds), None when it is none."""
        return None

    def collect(self, layer: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor], float]:
        """(kind, tensors by role, detached fp32, alpha) of a trained layer, as the file holds them."""
        raise NotImplementedError

    def load(self, layer: torch.nn.Module, t: dict[str, torch.Tensor], ratio: float) -> None:
        """Set a trained layer to a file's tensors `t` (by role, the shapes `collect` gives), with `ratio` = the
        file's scale / the layer's folded into one factor, so its ΔW is the file's (--init-lora). Under no_grad."""
        raise NotImplementedError(f"{self.name} layers cannot be loaded")

    def up_parameters(self, layer: torch.nn.Module) -> list:
        """The parameters of a trained layer's up (B) matrix, which LoRA+ (`--loraplus-ratio`) trains at a higher
        rate; [] for kinds without a down/up pair."""
        return []

    def trainable_count(self, layer: torch.nn.Module) -> int:
        """The parameters a trained layer of this kind should have (`sdlora.lora.inject.report`'s `expected`)."""
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)

    def network_args(self, net) -> dict[str, str]:
        """Its own LyCORIS network arguments (every value a string), beside `algo`."""
        return {}
