"""Storage precision of a frozen base model (--base-precision for the denoiser, --te-precision for frozen text
encoders): its Linear layers stored in fp8, int8 or nf4 (or a plain float dtype), computing in the training's
compute dtype. LoRA weights and their optimizer state stay in fp32 (they are added beside these layers by PEFT).

Which implementation per mode, and why:
- fp8 (float8_e4m3fn storage): `_StoredLinear` below, a Linear whose forward upcasts its weight to the compute dtype
  and whose backward upcasts it again, saving only the fp8 weight. diffusers' layerwise casting
  (`diffusers.hooks.apply_layerwise_casting`) does the same cast in forward, but it is written for inference: in a
  forward with autograd on, every layer's upcast copy stays referenced by the graph until backward, so a training
  step holds the whole model in the compute dtype next to the fp8 one (measured: 24 Linear 2048x2048, 96 MiB in
  fp8, +398 MiB RSS after the forward, the fp32 model). It is used where there is no backward and a module needs its
  children upcast together: transformers' T5 feed-forward (see `_UPCAST_TOGETHER`).
- bf16/fp16/fp32: stored in that dtype; when it differs from the compute dtype, `_StoredLinear` as for fp8 (e.g.
  bf16 storage with fp32 compute on CPU).
- int8, nf4: bitsandbytes' `Linear8bitLt` (LLM.int8 row-wise absmax, no outlier split: threshold 0) and
  `Linear4bit` (NF4, blocks of 64, double-quantised absmax: 0.516 bytes a weight), the layers diffusers' and
  transformers' bitsandbytes quantizers put in a model. Both run forward and backward (the gradient with respect to
  the input, which LoRA needs) on CPU with bitsandbytes >= 0.46, so they are tested here; their autograd functions
  save the quantised weight, not a dequantised copy. They are built per layer from weights already in memory, not
  through `from_pretrained(quantization_config=...)`, so that `quantize_` works on one block while a loader streams
  the next (and on a model built from a single file).

Only Linear layers are stored at the mode: bitsandbytes has no convolution layers, and Linear layers hold nearly all
of a transformer's weights (FLUX.1, SD3, T5, CLIP: over 99 %; an SDXL UNet about three quarters). Convolutions,
norms and embedding tables stay in the compute dtype, and so does what `default_skip` names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sdlora.errors import SdloraError, cause

MODES = ("fp32", "bf16", "fp16", "fp8", "int8", "nf4")  # storage precision of frozen weights
FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
if hasattr(torch, "float8_e4m3fn"):  # torch >= 2.1
    FLOAT["fp8"] = torch.float8_e4m3fn
BNB_MODES = ("int8", "nf4")
NF4_BLOCK = 64  # bitsandbytes' default 4-bit block size
MARK = "sdlora_precision"  # attribute set on every layer `quantize_` stored at a mode (memory.move leaves those alone)

# Bytes a stored weight takes, scales included, for the planner: nf4 packs two weights a byte plus, per block of 64,
# one 8-bit absmax (double quantisation) and per 256 blocks one fp32 scale of those; int8 adds one fp32 absmax per
# output row (4 / in_features bytes a weight: 0.001 at 3072 wide, counted at that width).
_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0 + 4 / 3072,
          "nf4": 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)}

# Modules whose forward casts their input to a child's weight dtype, and that child: transformers' T5 feed-forward
# casts its hidden states to `wo.weight.dtype` unless that is int8 (modeling_t5.py, "to make 8bit quantization work
# for google/flan-t5-xxl"). With an fp8 `wo` that would round activations to fp8, with an nf4 one (uint8 storage) it
# would turn them into bytes. So in these modules fp8 upcasts all children together before the module's forward
# (diffusers' layerwise-casting hook on the module: T5 runs without autograd, its outputs are cached), and nf4 stores
# that child's packed 4-bit bytes viewed as the compute dtype (bitsandbytes' `quant_storage`, made for FSDP): the
# module's cast is then to the dtype the layer computes in anyway. (It stored them in int8 before, the one quantised
# dtype the check lets through: twice the bytes, and bitsandbytes' CPU int8 matmul made one T5-XXL prompt take
# minutes.)
_UPCAST_TOGETHER = {"T5DenseActDense": "wo", "T5DenseGatedActDense": "wo"}

# Left in the compute dtype by default: embedders (timestep, guidance, pooled text, patch and position embeddings:
# under 1 % of the weights, and they turn a few numbers into the conditioning every block reads, so their error
# reaches everything), and the model's final layers (the error of `proj_out` / `conv_out` / CLIP's
# `text_projection` lands on the output directly). Names are full names in the model (`quantize_(..., prefix=)`).
_SKIP = re.compile(r"(^|\.)[^.]*embed[^.]*(\.|$)|^(proj_out|norm_out|conv_in|conv_out|conv_norm_out|text_projection"
                   r"|final_layer)(\.|$)")


def default_skip(name: str) -> bool:
    """Layers quantize_ leaves alone unless told otherwise: embedders and the final output layers (see _SKIP)."""
    return bool(_SKIP.search(name))


def bytes_per_param(mode: str) -> float:
    """Storage bytes per weight parameter of a layer stored at `mode`, scales included (for the planner). Layers the
    mode leaves alone (convolutions, norms, embeddings, `default_skip`) take the compute dtype's size."""
    _check_name(mode, "mode")
    return _BYTES[mode]


def _check_name(mode: str, what: str) -> None:
    if mode not in MODES:
        raise SdloraError(f"{what} {mode!r} is not a precision; use one of {', '.join(MODES)}")


def check_mode(mode: str, device: str | torch.device, what: str = "--base-precision") -> None:
    """One-line SdloraError, before any large load, when `mode` cannot run on `device` here: torch without float8,
    bitsandbytes missing or unable to quantise on this device (tried on a 64x64 layer, forward and backward)."""
    _check_name(mode, what)
    device = torch.device(device)
    if mode == "fp8" and "fp8" not in FLOAT:
        raise SdloraError(f"{what} fp8 needs torch 2.1 or newer (float8 dtypes); this torch is {torch.__version__}: "
                          "upgrade torch, or use int8/nf4/bf16")
    if mode not in BNB_MODES:
        return
    from sdlora import lazy

    try:
        lazy.bitsandbytes()
    except Exception as e:  # ImportError, or a library that fails to find its native kernels
        raise SdloraError(f"{what} {mode} needs bitsandbytes, which cannot load here ({cause(e)}); "
                          "pip install 'bitsandbytes>=0.46', or use --base-precision fp8") from e
    try:
        layer = quantize_(nn.Sequential(nn.Linear(64, 64)).requires_grad_(False), mode, torch.float32, skip=None)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
    except Exception as e:
        raise SdloraError(f"{what} {mode}: the installed bitsandbytes cannot run it on {device.type} ({cause(e)}); "
                          "upgrade it (pip install -U bitsandbytes; CPU needs >= 0.46), or use fp8") from e
    if not ok:
        raise SdloraError(f"{what} {mode}: bitsandbytes gives no finite gradient on {device.type}; upgrade it "
                          "(pip install -U bitsandbytes), or use fp8")


def quantize_(module: nn.Module, mode: str, compute_dtype: torch.dtype,
              skip: Callable[[str], bool] | None = default_skip, prefix: str = "") -> nn.Module:
    """Store the frozen Linear layers of `module` at `mode`, computing in `compute_dtype`, in place; returns `module`
    (or the replacement when `module` itself is a Linear). Works on a whole model or on one block at a time (a
    streaming loader): `prefix` is the block's name in its model ("transformer_blocks.3"), so that `skip(full name)`
    sees the names a whole-model call would; `skip=None` stores every Linear. Weights may be on the CPU or the
    device; they are converted where they are, one layer at a time (no second copy of the module). The stored layers
    are frozen (requires_grad False): call it before adding LoRA, on the frozen parts only."""
    _check_name(mode, "precision")
    skip = skip or (lambda name: False)
    full = (lambda n: f"{prefix}.{n}" if n else prefix) if prefix else (lambda n: n)
    together = {_join(n, _UPCAST_TOGETHER[type(m).__name__]): m for n, m in module.named_modules()
                if type(m).__name__ in _UPCAST_TOGETHER and hasattr(m, _UPCAST_TOGETHER[type(m).__name__])
                and not stored(getattr(m, _UPCAST_TOGETHER[type(m).__name__]))}
    # plain nn.Linear only (not one stored already, nor a subclass such as PEFT's wrappers or bitsandbytes' layers)
    layers = [(n, m) for n, m in module.named_modules()
              if type(m) is nn.Linear and not stored(m) and not skip(full(n))]
    for _, layer in layers:
        layer.requires_grad_(False)  # a stored layer is frozen: it gets no gradient (LoRA beside it does)
    if mode == "fp8" and together:
        _upcast_together(together, FLOAT["fp8"], compute_dtype)
    replaced = None
    for name, layer in layers:
        if mode == "fp8" and name in together:
            continue  # stored in fp8 by its parent's hook
        new = _convert(layer, mode, compute_dtype, storage_as_compute=name in together)
        if new is not layer:
            replaced = _put(module, name, new) or replaced
    return replaced or module


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _put(module: nn.Module, name: str, new: nn.Module) -> nn.Module | None:
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, new)
    return None


def _convert(layer: nn.Linear, mode: str, compute: torch.dtype, storage_as_compute: bool = False) -> nn.Module:
    if mode == "nf4" and nf4_block(layer.in_features) is None:
        return layer  # see nf4_block
    if mode in BNB_MODES:
        return _bnb(layer, mode, compute, storage_as_compute)
    storage = FLOAT[mode]
    with torch.no_grad():
        layer.weight.data = layer.weight.data.to(storage)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(compute if storage != compute else storage)
    if storage != compute:
        layer.__class__ = _StoredLinear  # same object, same parameters: only forward/backward change
        layer.compute_dtype = compute  # also what PEFT casts LoRA weights to (not the fp8 storage dtype)
    setattr(layer, MARK, mode)
    return layer


def nf4_block(in_features: int) -> int | None:
    """The nf4 block size for a Linear of this input width: bitsandbytes' default 64 where a weight row holds whole
    blocks, else 32 where it does, else None (the layer is not stored at nf4).

    Why: bitsandbytes 0.50.2's CPU `dequantize_4bit` on AVX512 machines (its C kernel, used when torch reports the
    AVX512 capability) takes the blocks row by row, so a row that is not a whole number of blocks dequantises wrong
    (a 64x32 weight: max error 1.6 against the exact dequantisation; rows of 128 or 320: exact). Every layer of the
    real models is a multiple of 64 wide; the tiny test models have rows of 32 (block 32, exact) and a few of 16
    times an odd number (left in the compute dtype, on every machine alike, so results don't depend on the CPU)."""
    for block in (NF4_BLOCK, 32):
        if in_features % block == 0:
            return block
    return None


def _bnb(layer: nn.Linear, mode: str, compute: torch.dtype, storage_as_compute: bool = False) -> nn.Module:
    from sdlora import lazy

    bnb = lazy.bitsandbytes()
    device, has_bias = layer.weight.device, layer.bias is not None
    w = layer.weight.data
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=0.0, device="meta")
        # Int8Params quantises when moved from the CPU to a device (the CPU included); from another device, via CPU
        new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        storage = compute if storage_as_compute else torch.uint8  # see _UPCAST_TOGETHER
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=has_bias, compute_dtype=compute,
                                compress_statistics=True, quant_type="nf4", quant_storage=storage, device="meta")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                       blocksize=nf4_block(layer.in_features), module=new,
                                       quant_storage=storage)
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place at the first no-grad eval forward
        # (`_convert_weight_packed_for_cpu`) into an inference-only layout: it asserts out_features % 32 == 0 (tiny
        # models' widths fail), computes in bf16 from then on, and routes every later call, training ones included,
        # through `gemv_4bit`, which has no backward to the input (LoRA layers before it would get no gradient).
        # A frozen base that trains LoRA around it needs the ordinary nf4 matmul: keep bitsandbytes off that path.
        new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = nn.Parameter(layer.bias.data.to(compute), requires_grad=False)
    new.weight = new.weight.to(device)  # quantises (bitsandbytes does it on this move)
    layer.weight = None  # the unquantised weight goes now, not when the caller drops the old layer
    setattr(new, MARK, mode)
    return new


class _Fp8Matmul(torch.autograd.Function):
    """x @ W.T + b with W stored in a narrow dtype: upcast to `dtype` in forward, and again in backward, so autograd
    keeps the stored weight (1 byte a value for fp8), not an upcast copy. W and b are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        out = torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.x_dtype)), None, None, None


class _StoredLinear(nn.Linear):
    """A frozen Linear whose weight is stored in another dtype than it computes in (`compute_dtype`)."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.bias, self.compute_dtype)


def _upcast_together(modules: dict[str, nn.Module], storage: torch.dtype, compute: torch.dtype) -> None:
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    for parent in modules.values():
        apply_layerwise_casting_hook(parent, storage, compute, non_blocking=False)  # casts its children to fp8 now
        for child in parent.modules():
            if isinstance(child, nn.Linear):
                setattr(child, MARK, "fp8")


@dataclass(frozen=True)
class Precision:
    """What `apply` stores a loaded model at: `base` for the denoiser, `te` for the text encoders that stay frozen
    (None: as loaded), computing in `compute`; `trained_te(spec)` names the text encoders (kohya components) that
    train, which keep their precision (LoRA's base layers are only quantised when frozen)."""

    base: str | None = None
    te: str | None = None
    compute: torch.dtype = torch.float32
    trained_te: Callable | None = None

    @property
    def any(self) -> bool:
        return bool(self.base or self.te)


def apply(base, precision: Precision) -> list[str]:
    """Store a loaded BaseModel's modules as `precision` says, module by module; the text encoders (kohya components)
    left alone because they train."""
    if precision.base:
        quantize_(base.denoiser, precision.base, precision.compute)
    kept = []
    if precision.te:
        trained = precision.trained_te(base.spec) if precision.trained_te else set()
        for component, (_, te) in base.text_encoders.items():
            if component in trained:
                kept.append(component)
            else:
                quantize_(te, precision.te, precision.compute)
    return kept


def stored(module: nn.Module) -> bool:
    """Whether quantize_ stored this layer at a precision of its own (memory.move must not cast it)."""
    return hasattr(module, MARK)


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The logical [out, in(, kh, kw)] shape of a layer's weight: nf4 packs a Linear's weight into [n/2, 1] bytes,
    so a Linear's shape comes from its features."""
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return tuple(layer.weight.shape)


def module_bytes(module: nn.Module) -> int:
    """Bytes `module`'s parameters and buffers take as stored now, bitsandbytes' scales included."""
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
        for extra in _scales(t):
            n += extra.numel() * extra.element_size()
    return n


def _scales(t: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a bitsandbytes parameter keeps beside its data: int8's row absmax (SCB), nf4's quant state."""
    out = []
    scb = getattr(t, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    qs = getattr(t, "quant_state", None)
    while qs is not None:
        out += [x for x in (getattr(qs, "absmax", None), getattr(qs, "code", None)) if isinstance(x, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out
