"""`sdlora plan` and `sdlora train --vram GB`: the settings that fit a training run in a GPU's memory, with the bytes.

Nothing is loaded: parameter counts come from the model's safetensors headers (a diffusers folder) or from the
real-size model built on the meta device from its configs (the folder's `config.json` files; for hub ids and
built-in names the public configs in sdlora/archs/), and the activations are counted on that meta model
(sdlora/train/activations.py) at the run's resolution, batch, targets and rank. What is measured and what is
estimated is said on each line of the plan.

The choice, in order of preference: a bf16 base with no block swap; else an fp8 base (kohya's `--fp8_base`), else
nf4; within a base precision, gradient checkpointing off when it fits; then the cheapest of text-encoder precision
and block swap, where an fp8 text encoder costs as much as swapping 15 % of the denoiser's weights and nf4 40 % (the
text encoders only encode the prompts once, the swap costs every step). Latents and text embeddings are always
cached (they only save memory), and the text encoders frozen unless the run trains them and that fits.

Two phases where SD3/FLUX load piece by piece (a local folder or single files; `Shape.encode_first`): with frozen
text encoders every prompt is encoded first and the encoders leave memory before the denoiser loads
(`_Run.encode_first` in sdlora/train/loop.py), so the GPU holds the larger of the text-encoding phase (the frozen
encoders, the VAE) and the training phase (denoiser, VAE, LoRA, activations, trained encoders), not their sum. Elsewhere
(built-in models, hub ids, UNet families) the text encoders share the GPU with the denoiser until every prompt is
cached: one phase, the sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdlora.config import QUANTISED
from sdlora.errors import SdloraError

GIB = 2**30
CONTEXT = 0.6 * GIB  # CUDA context + cuBLAS workspace (estimated)
FRAGMENTATION = 0.05  # of the card kept free for the caching allocator's rounding (estimated)
BASES = ("bf16", "fp8", "nf4")
TES = ("bf16", "fp8", "nf4")
TE_COST = {"bf16": 0.0, "fp8": 0.15, "nf4": 0.40}
STATE = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4, "schedulefree": 8}  # optimizer bytes per value


def _quant():
    """Bytes per weight at a precision and the layers the quantiser leaves alone (sdlora/quant.py)."""
    from sdlora.quant import bytes_per_param, default_skip

    return bytes_per_param, default_skip


@dataclass
class Shape:
    """A model's structure without its weights."""

    name: str
    spec: object
    denoiser: object  # real-size on the meta device (built-in models: the real tiny module)
    text_encoders: dict  # kohya component -> module
    vae: object
    scheduler_config: dict
    source: str  # where the parameter counts come from
    header_params: dict = field(default_factory=dict)  # component -> parameters counted in safetensors headers
    encode_first: bool = False  # loaded piece by piece (SD3/FLUX folders, files): prompts encoded before the denoiser


def _numel(files: list[Path]) -> int:
    """Values stored in safetensors files, from their headers (nothing else is read)."""
    import math

    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names = st.keys()
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in names)
    return n


def _folder(path: Path) -> Shape:
    import torch

    from sdlora import archs

    index = json.loads((path / "model_index.json").read_text())
    spec = next((s for s in archs.SPECS.values() if s.pipeline == index.get("_class_name")), None)
    if spec is None:
        raise SdloraError(f"{path}: a {index.get('_class_name')} folder; sdlora plans "
                          + ", ".join(s.label for s in archs.SPECS.values()))

    def meta(sub: str):
        with torch.device("meta"):
            return archs.build(json.loads((path / sub / "config.json").read_text()))

    comps = {"unet": spec.denoiser} | {t.component: t.attr for t in spec.text_encoders} | {"vae": "vae"}
    counts = {c: _numel(sorted((path / sub).glob("*.safetensors"))) for c, sub in comps.items()}
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return Shape(str(path), spec, meta(spec.denoiser), {t.component: meta(t.attr) for t in spec.text_encoders},
                 meta("vae"), sched, "safetensors headers (counts), config.json on the meta device (layers)", counts,
                 _piece_by_piece(spec))


def _piece_by_piece(spec) -> bool:
    """Does sdlora load this family's folders and single files piece by piece (sdlora/bigload.py: SD3, FLUX)?"""
    return spec.denoiser_names == "original"


def shape_of(model: str) -> Shape:
    """The structure of `model` (a built-in name, a known hub id, a local diffusers folder), no weights read."""
    from sdlora import archs
    from sdlora.tiny import TINY_MODELS, tiny_components

    if model in TINY_MODELS:
        spec = archs.get(TINY_MODELS[model])
        parts = tiny_components(spec)
        return Shape(model, spec, parts[spec.denoiser], {t.component: parts[t.attr] for t in spec.text_encoders},
                     parts["vae"], parts["scheduler_config"], "the built-in model")
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return _folder(path)
    if model in archs.PUBLIC_MODELS:
        arch, variant = archs.PUBLIC_MODELS[model]
        spec = archs.get(arch)
        return Shape(model, spec, archs.meta_model(arch, spec.denoiser, variant),
                     {t.component: archs.meta_model(arch, t.attr) for t in spec.text_encoders},
                     archs.meta_model(arch, "vae"), archs.load_config(arch, "scheduler"),
                     "the public configs (sdlora/archs/) on the meta device")
    raise SdloraError(f"sdlora plan reads a local diffusers folder, a built-in model ({', '.join(TINY_MODELS)}) or "
                      f"a hub id it has the configs of ({', '.join(archs.PUBLIC_MODELS)}); '{model}' is none of them")


def weight_bytes(module, mode: str, prefix: str = "") -> float:
    """Bytes of `module`'s weights with its Linear layers stored at `mode` (layers the quantiser leaves alone and
    every other parameter in bf16), and its buffers in their own dtype (SD3's position embedding: fp32)."""
    import torch

    per, skip = _quant()
    total = 0.0
    for name, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            quantised = isinstance(sub, torch.nn.Linear) and pname == "weight" and not skip(f"{prefix}{name}")
            total += p.numel() * (per(mode) if quantised else 2.0)
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def lora_values(module, targets: list[str], rank: int) -> int:
    mods = dict(module.named_modules())
    n = 0
    for t in targets:
        m = mods[t]
        fan_in = getattr(m, "in_features", None) or m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        n += rank * (fan_in + (getattr(m, "out_features", None) or m.out_channels))
    return n


@dataclass(frozen=True)
class Run:
    """What the plan is for (from the training settings)."""

    resolution: int | None = None
    batch_size: int = 1
    rank: int = 4
    preset: str = "default"
    optimizer: str = "adamw"
    train_te: bool = False


@dataclass(frozen=True)
class Choice:
    base: str = "bf16"
    te: str = "bf16"
    checkpointing: bool = False
    swap: int = 0
    train_te: bool = False

    def flags(self) -> str:
        out = f"--base-precision {self.base} --te-precision {self.te}"
        out += " --gradient-checkpointing" if self.checkpointing else ""
        out += " --no-gradient-checkpointing" if not self.checkpointing and self.base in QUANTISED else ""
        out += f" --blocks-to-swap {self.swap}" if self.swap else ""
        return out + ("" if self.train_te else " --no-text-encoder")


@dataclass
class Plan:
    shape: Shape
    run: Run
    resolution: int
    vram: float
    choice: Choice | None
    rows: list[tuple[str, float, str]]  # (what, bytes, how it was obtained)
    total: float  # the GPU's peak: the larger phase's sum when the text encoders go first, else every row's
    budget: float
    smallest: tuple[Choice, float] | None = None

    @property
    def fits(self) -> bool:
        return self.choice is not None

    def text(self) -> str:
        s, r = self.shape, self.run
        head = (f"plan for {s.name} ({s.spec.label}; parameters from {s.source}) at {self.resolution} px, batch "
                f"{r.batch_size}, rank {r.rank}, preset '{r.preset}', {r.optimizer}, on a {self.vram:g} GB GPU")
        lines = [head]
        if self.choice is None:
            c, need = self.smallest
            lines.append(f"  does not fit: the smallest plan ({c.flags()}) needs {need / GIB:.1f} GiB, the card "
                         f"leaves {self.budget / GIB:.1f} GiB; lower --resolution or --batch-size, or a larger GPU")
            return "\n".join(lines)
        lines.append(f"  chosen: {self.choice.flags()}; latents and text embeddings cached")
        for what, n, how in self.rows:
            lines.append(f"  {what:<46} {n / GIB:7.2f} GiB  {how}" if n is not None else f"  {what}")
        lines.append(f"  {'total':<46} {self.total / GIB:7.2f} GiB  of {self.budget / GIB:.2f} GiB usable ("
                     f"{self.vram:g} GiB less {CONTEXT / GIB:.1f} GiB CUDA context and {FRAGMENTATION:.0%} "
                     "for the allocator: estimated)")
        return "\n".join(lines)


class Planner:
    """The byte counts of one model and run, for any choice; `plan(vram)` picks the choice."""

    def __init__(self, shape: Shape, run: Run):
        from sdlora.lora.targets import find_targets
        from sdlora.train import swap

        self.shape, self.run = shape, run
        spec, den = shape.spec, shape.denoiser
        self.resolution = run.resolution or spec.native_resolution
        den.requires_grad_(False)
        self.targets = find_targets(den, "unet", run.preset, spec)
        self.lora = {"unet": lora_values(den, self.targets, run.rank)}
        for c, te in shape.text_encoders.items():
            if c in spec.trainable_te_components:
                te_targets = find_targets(te, c, run.preset, spec)
                if te_targets:
                    self.lora[c] = lora_values(te, te_targets, run.rank)
        self.lengths = swap.lengths_of(spec, den) if spec.swap_blocks else ()
        self.max_swap = swap.maximum(spec, self.lengths) if spec.swap_blocks else 0
        # weights per precision, whole and per swappable block, counted before the LoRA layers go in
        names = {id(m): k for k, m in den.named_modules()}
        blocks = swap.chosen(spec, den, self.max_swap) if self.max_swap else []
        self.whole = {m: weight_bytes(den, m) for m in BASES}
        self.blocks = {m: {id(b): weight_bytes(b, m, names[id(b)] + ".") for b in blocks} for m in BASES}
        self.te_bytes = {(c, m): weight_bytes(te, m) for c, te in shape.text_encoders.items() for m in TES}
        self.vae = self.vae_bytes()
        self.acts = self._activations()
        self._rows: dict = {}

    # ---- bytes
    def denoiser(self, mode: str, n: int) -> tuple[float, float]:
        """(bytes on the device, bytes in host memory) of the denoiser at `mode` with N blocks swapped: the
        swapped blocks leave the device but up to CAPACITY + 1 of their copies are there at once."""
        from sdlora.train import swap

        sizes = [self.blocks[mode][id(b)] for b in swap.chosen(self.shape.spec, self.shape.denoiser, n)] if n else []
        resident = min((swap.CAPACITY + 1) * max(sizes), sum(sizes)) if sizes else 0.0
        return self.whole[mode] - sum(sizes) + resident, sum(sizes)

    def _activations(self):
        import torch

        from sdlora.train import activations
        from sdlora.train import step as S

        shape, run = self.shape, self.run
        spec, den, vae = shape.spec, shape.denoiser, shape.vae
        # the adapted layers as training has them: a LoRA on each target (on meta tensors: no memory)
        from sdlora.lora.inject import add_lora

        probe = den.to("meta").to(torch.bfloat16)  # a meta model stays; a built-in one becomes meta (it is ours)
        add_lora(probe, self.targets, run.rank, float(run.rank))
        import diffusers

        sched = getattr(diffusers, spec.scheduler).from_config(
            {k: v for k, v in shape.scheduler_config.items() if not k.startswith("_")})
        objective = S.objective_for(spec, sched, probe.config)
        cfg = probe.config
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        side = self.resolution // f
        b, bf16 = run.batch_size, torch.bfloat16
        tokens = (77 if any(t.hidden and not t.sequence_join for t in spec.text_encoders) else 0) + sum(
            t.max_length or 77 for t in spec.text_encoders if t.sequence_join)
        width = getattr(cfg, "joint_attention_dim", None) or cfg.cross_attention_dim
        with torch.device("meta"):
            latents = torch.empty(b, vae.config.latent_channels, side, side, dtype=bf16)
            cond = torch.empty(b, tokens, width, dtype=bf16)
            pooled_dim = getattr(cfg, "pooled_projection_dim", None) or (
                (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
                if spec.micro_conditioning else None)
            pooled = torch.empty(b, pooled_dim, dtype=bf16) if pooled_dim else None
            added = (S.added_cond(pooled, torch.empty(b, 6)) if spec.micro_conditioning
                     else {"pooled": pooled} if pooled is not None else None)
            t = objective.fixed_timesteps(500, b, "meta")
        # outside the device context: under `torch.device` every op goes through a Python mode (5x slower)
        return activations.count(probe, lambda: objective.predict(probe, latents, t, cond, added).float().square()
                                 .mean())

    def vae_bytes(self) -> tuple[float, float]:
        """(fp32 weights, encoding activations: three feature maps of its first width in bf16, estimated)."""
        vae = self.shape.vae
        first = vae.config.block_out_channels[0]
        return (sum(p.numel() for p in vae.parameters()) * 4.0,
                3.0 * self.run.batch_size * first * self.resolution ** 2 * 2)

    def rows(self, c: Choice) -> list[tuple[str, float, str]]:
        if c not in self._rows:
            self._rows[c] = self._rows_of(c)
        return self._rows[c]

    def first(self, c: Choice) -> list[str]:
        """The text encoders that encode every prompt and leave the GPU before the denoiser loads (none unless the
        model loads piece by piece): the frozen ones (all, or T5-XXL beside trained CLIP encoders)."""
        if not self.shape.encode_first:
            return []
        return [comp for comp in self.shape.text_encoders if not (c.train_te and comp in self.lora)]

    def phases(self, c: Choice) -> list[tuple[str, list[tuple[str, float, str]]]]:
        """(phase, rows) in order: the text-encoding phase when the frozen encoders go first, then training."""
        first = self.first(c)
        vae_w, _ = self.vae
        text = [(f"text encoder {comp} ({c.te})", self.te_bytes[comp, c.te], "counted") for comp in first]
        train = self._training_rows(c, [comp for comp in self.shape.text_encoders if comp not in first])
        if not first:
            return [("", train)]
        return [("text encoding (prompts encoded first; then the encoders leave the GPU)",
                 text + [("VAE weights (fp32)", vae_w, "counted")]), ("training", train)]

    def _rows_of(self, c: Choice) -> list[tuple[str, float, str]]:
        phases = self.phases(c)
        if len(phases) == 1:
            return phases[0][1]
        rows = []
        for name, rs in phases:
            rows.append((f"{name}: {sum(n for what, n, _ in rs if not what.startswith('  ')) / GIB:.2f} GiB", None,
                         ""))
            rows += [("  " + what, n, how) for what, n, how in rs]
        return rows

    def _training_rows(self, c: Choice, tes: list[str]) -> list[tuple[str, float, str]]:
        from sdlora.train import swap

        spec, run = self.shape.spec, self.run
        dev, host = self.denoiser(c.base, c.swap)
        rows = [(f"{spec.denoiser} weights ({c.base}, on the GPU)", dev, "counted")]
        if c.swap:
            counts = swap.split(spec, self.lengths, c.swap)
            what = " + ".join(f"{k} {a}" for k, a in zip(counts, spec.swap_blocks) if k)
            rows.append((f"  block swap saves ({what})", self.whole[c.base] - dev,
                         (f"counted: {host / GIB:.1f} GiB in pinned host memory, {swap.CAPACITY + 1} blocks' "
                          "copies on the GPU at once; not in the total")))
        for comp in tes:
            mode = "bf16" if (c.train_te and comp in self.lora) else c.te
            rows.append((f"text encoder {comp} ({mode})", self.te_bytes[comp, mode], "counted"))
        vae_w, vae_a = self.vae
        rows.append(("VAE weights (fp32)", vae_w, "counted"))
        values = self.lora["unet"] + (sum(v for k, v in self.lora.items() if k != "unet") if c.train_te else 0)
        per = 8 + STATE.get(run.optimizer, 8)
        rows.append((f"LoRA {values / 1e6:.1f} M values x {per} B (weights, grads, {run.optimizer})",
                     values * per, "counted"))
        act = self.acts.peak(c.checkpointing)
        how = ("measured on the meta device: saved tensors" + (" (block inputs + one block recomputed)"
               if c.checkpointing else "") + "; + backward working set (estimated)")
        rows.append((f"activations{' (gradient checkpointing)' if c.checkpointing else ''}", max(act, vae_a), how
                     + (f"; VAE encoding {vae_a / GIB:.2f} GiB is larger (estimated)" if vae_a > act else "")))
        return rows

    def total(self, c: Choice) -> float:
        """The GPU's peak: the larger phase ("  " rows are informative: not counted)."""
        return max(sum(n for what, n, _ in rows if not what.startswith("  ")) for _, rows in self.phases(c))

    def candidates(self):
        """Every choice, in the order of preference (module docstring), with its cost within a base precision."""
        out = []
        for base in BASES:
            for gc in (False, True):
                for te in TES:
                    for n in (range(self.max_swap + 1) if base != "bf16" else (0,)):
                        for train_te in ((True, False) if self.run.train_te else (False,)):
                            cost = TE_COST[te] + (self.denoiser(base, n)[1] / self.whole[base] if n else 0)
                            out.append(((BASES.index(base), gc, not train_te, cost),
                                        Choice(base, te, gc, n, train_te)))
        return [c for _, c in sorted(out, key=lambda x: x[0])]

    def plan(self, vram_gb: float) -> Plan:
        budget = vram_gb * GIB * (1 - FRAGMENTATION) - CONTEXT
        best = None
        smallest = None
        for c in self.candidates():
            need = self.total(c)
            if smallest is None or need < smallest[1]:
                smallest = (c, need)
            if need <= budget:
                best = c
                break
        if best is None:
            return Plan(self.shape, self.run, self.resolution, vram_gb, None, [], 0, budget, smallest)
        return Plan(self.shape, self.run, self.resolution, vram_gb, best, self.rows(best), self.total(best), budget)


def run_of(cfg) -> Run:
    from sdlora.lora.targets import preset_targets  # noqa: F401  (the preset is validated by TrainConfig)

    return Run(cfg.max_resolution, cfg.batch_size, cfg.rank, cfg.preset, cfg.optimizer, not cfg.no_text_encoder)


def apply(cfg, plan: Plan):
    """`cfg` with the plan's choices (block swap, gradient checkpointing, text encoder frozen, precisions)."""
    c = plan.choice
    changes = {"blocks_to_swap": c.swap, "gradient_checkpointing": c.checkpointing,
               "no_gradient_checkpointing": not c.checkpointing, "no_text_encoder": not c.train_te}
    for name, value in (("base_precision", c.base), ("te_precision", c.te)):
        if hasattr(cfg, name):
            changes[name] = value
        elif value != "bf16":
            raise SdloraError(f"the plan for --vram {plan.vram:g} needs --{name.replace('_', '-')} {value}, which "
                              "this sdlora does not have")
    return replace(cfg, **changes)


def add_plan_args(p) -> None:
    p.add_argument("--model", default=None, help="a local diffusers folder, a built-in model or a known hub id "
                   "(default: the --config file's, else black-forest-labs/FLUX.1-dev)")
    p.add_argument("--vram", default=None, metavar="GB", help="the GPU's memory in GB (as nvidia-smi "
                   "counts it: GiB); several with commas, e.g. 8,12,16,24")
    p.add_argument("--config", metavar="FILE", help="a training TOML (configs/): its model, resolution, batch size, "
                   "rank, preset, optimizer, text-encoder training and vram")
    for flag, kind in (("--resolution", int), ("--batch-size", int), ("--rank", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--optimizer", default=None)


def cmd_plan(args) -> int:
    from sdlora.config import load_toml

    values = load_toml(args.config) if args.config else {}
    for k in ("model", "resolution", "batch_size", "rank", "preset", "optimizer"):
        if getattr(args, k) is not None:
            values[k] = getattr(args, k)
    vram = args.vram if args.vram is not None else values.get("vram")
    if vram is None:
        raise SdloraError("--vram is required (the GPU's memory in GB, e.g. 12), here or as `vram` in --config")
    sizes = [float(v) for v in str(vram).split(",")]
    run = Run(values.get("resolution"), values.get("batch_size", 1), values.get("rank", 4),
              values.get("preset", "default"), values.get("optimizer", "adamw"), not values.get("no_text_encoder"))
    planner = Planner(shape_of(values.get("model", "black-forest-labs/FLUX.1-dev")), run)
    plans = [planner.plan(v) for v in sizes]
    print("\n\n".join(p.text() for p in plans))
    return 0 if all(p.fits for p in plans) else 1
