"""Which modules get a LoRA: named presets turned into the exact module names of a loaded model.

Only this module decides targets. Names are the model's own (`named_modules()`), so the same preset gives the
same modules on the tiny model and on real SD 1.5.
"""

from __future__ import annotations

import re
import typing

if typing.TYPE_CHECKING:  # torch is imported where a model is searched: `sdlora --help` reads PRESETS
    import torch

# preset -> column -> (what it adapts, in words; regex fullmatched against module names). A family uses the
# columns its spec names (`ArchSpec.preset_columns`): UNet families "unet" + "te", the diffusion transformers
# (SD 3.x, FLUX.1) "transformer" + "transformer_te"; a preset without a family's text-encoder column leaves its
# text encoders alone.
_DIT_ATTN = (r"(single_)?transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
             r"to_add_out)")
_DIT_ALL = (r"(single_)?transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
            r"to_add_out)|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear|norm\.linear|proj_mlp|proj_out)")
PRESETS: dict[str, dict[str, tuple[str, str]]] = {
    # The DreamBooth-LoRA default: the UNet's cross-attention query/value (where text meets image) and the
    # text encoder's four attention projections. q/k/v/out rather than q/v for the text encoder, because
    # diffusers' kohya loader rejects a text-encoder part with only q/v (see docs/kohya-format.md §6).
    # SD 3.x / FLUX.1: the joint (and single-stream) attention's q, k, v and out projections of both streams, as
    # diffusers' SD3/FLUX DreamBooth-LoRA scripts default to; no text encoder.
    "default": {
        "unet": ("cross-attention q, v", r".*\.attn2\.to_(q|v)"),
        "te": ("self-attention q, k, v, out", r".*\.self_attn\.(q|k|v|out)_proj"),
        "transformer": ("joint/single attention q, k, v, out", _DIT_ATTN),
    },
    # Every attention projection, self- and cross-attention (SD 3.x / FLUX.1: plus the CLIP text encoders).
    "attn": {
        "unet": ("attention q, k, v, out", r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"),
        "te": ("self-attention q, k, v, out", r".*\.self_attn\.(q|k|v|out)_proj"),
        "transformer": ("joint/single attention q, k, v, out", _DIT_ATTN),
        "transformer_te": ("CLIP self-attention q, k, v, out", r".*\.self_attn\.(q|k|v|out)_proj"),
    },
    # kohya's own default (LoRA-LierLa): every Linear and 1x1 conv inside the UNet's transformer blocks, and
    # the text encoder's attention and MLP. The widest preset that every loader maps. SD 3.x / FLUX.1: every
    # Linear of the transformer blocks (attention, MLPs, modulation), as kohya's lora_sd3/lora_flux train, and CLIP.
    "full": {
        "unet": ("all Linear/1x1 conv in transformer blocks",
                 r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
                 r"ff\.net\.0\.proj|ff\.net\.2))"),
        "te": ("attention q, k, v, out and MLP fc1, fc2", r".*\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"),
        "transformer": ("all Linear in joint/single blocks (attention, MLP, modulation)", _DIT_ALL),
        "transformer_te": ("CLIP attention q, k, v, out and MLP fc1, fc2",
                           r".*\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"),
    },
}


def regexes(text: str | None) -> list[str]:
    """The comma-separated regexes of --targets/--exclude (a comma inside {m,n} or a character class stays)."""
    if not text:
        return []
    out, depth, cur, escaped = [], 0, "", False
    for ch in text:
        was_escaped, escaped = escaped, False
        if was_escaped:
            pass
        elif ch == "\\":
            escaped = True
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0 and not was_escaped:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [r for r in out if r]


def preset_targets(preset: str, component: str, spec=None) -> tuple[str, str] | None:
    """(words, regex) of what `preset` adapts in `component` ("unet", or a text encoder "te", "te1", ...) of a
    family `spec` (None: a UNet family); None when the preset leaves that component alone."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    den, te = spec.preset_columns if spec is not None else ("unet", "te")
    return PRESETS[preset].get(te if component.startswith("te") else den)


def find_targets(model: torch.nn.Module, component: str, preset: str, spec=None) -> list[str]:
    """Names of the modules of `model` that `preset` adapts for `component` ("unet", or a text encoder: "te",
    "te1", "te2") of family `spec` (None: a UNet family), in model order."""
    import torch

    found = preset_targets(preset, component, spec)
    if found is None:
        return []
    pattern = re.compile(found[1])
    names = []
    for name, module in model.named_modules():
        if not pattern.fullmatch(name):
            continue
        if isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            names.append(name)
    return names


def check_rank(models: dict[str, torch.nn.Module], targets: dict[str, list[str]], rank: int, model_name: str) -> None:
    """A rank above the narrowest adapted layer's width only adds parameters (the delta's rank cannot exceed it);
    refuse it, naming that layer and the largest useful rank."""

    from sdlora.errors import SdloraError
    from sdlora.quant import weight_shape

    narrowest = None
    for component, names in targets.items():
        for name in names:
            shape = weight_shape(models[component].get_submodule(name))  # nf4 packs the weight itself
            width = min(shape[0], shape[1])
            if narrowest is None or width < narrowest[0]:
                narrowest = (width, f"{component}.{name}")
    if narrowest and rank > narrowest[0]:
        raise SdloraError(f"--rank {rank} is larger than the narrowest adapted layer of {model_name} "
                          f"({narrowest[1]}, {narrowest[0]} wide); pass --rank {narrowest[0]} or lower")


# The kxk convolutions LyCORIS's `full` preset adds to the attention Linear layers: every conv inside the UNet's
# ResNet blocks and down/up-samplers (docs/lycoris-and-dit.md §1.4; ResnetBlock2D, Downsample2D, Upsample2D).
CONV_PATTERN = re.compile(r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)")


def conv_targets(model: torch.nn.Module) -> list[str]:
    """Names of the Conv2d modules LoCon/LoHa/LoKr add (none in a text encoder), in model order."""
    import torch

    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and CONV_PATTERN.fullmatch(name)]


def _adaptable(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1))


def refine(models: dict[str, torch.nn.Module], targets: dict[str, list[str]], include: list[str],
           exclude: list[str]) -> dict[str, list[str]]:
    """`targets` ({component: module names}, from the preset) plus the Linear/1x1-conv modules of `models` whose
    name any `include` regex is found in (re.search), minus those any `exclude` regex is found in, in model order.
    A regex that finds nothing (include: among the adaptable modules; exclude: among the chosen ones) is refused in
    one line, with a module name to model it on."""
    from sdlora.errors import SdloraError

    out = {}
    hits = {r: 0 for r in include}
    for c, m in models.items():
        chosen = set(targets.get(c, []))
        names = [n for n, mod in m.named_modules() if n and _adaptable(mod)]
        for r in include:
            found = {n for n in names if re.search(r, n)}
            hits[r] += len(found)
            chosen |= found
        out[c] = [n for n in names if n in chosen]
    for r, n in hits.items():
        if not n:
            example = next((f"{c}: {n}" for c, m in models.items() for n, mod in m.named_modules() if _adaptable(mod)),
                           "none")
            raise SdloraError(f"--targets {r!r} matches no Linear or 1x1 conv module of {', '.join(models)} "
                              f"(names look like {example}); check the regex")
    for r in exclude:
        if not any(re.search(r, n) for names in out.values() for n in names):
            raise SdloraError(f"--exclude {r!r} matches none of the {sum(map(len, out.values()))} modules chosen "
                              f"(e.g. {next((n for ns in out.values() for n in ns), 'none')}); check the regex")
        out = {c: [n for n in names if not re.search(r, n)] for c, names in out.items()}
    if not any(out.values()):
        raise SdloraError("--exclude leaves no module to adapt; exclude fewer")
    return out
