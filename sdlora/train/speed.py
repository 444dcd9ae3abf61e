"""Speed options of the denoiser: torch.compile (through accelerate's dynamo plugin), the attention kernel, and
channels-last memory format. All off by default; `benchmarks/bench_train.py` measures them. Imports no torch at
module level: config.py (and so `sdlora train --help`) reads ATTENTION.

Attention: diffusers 0.42's `ModelMixin.set_attention_backend` (attention_dispatch) only reaches processors that
dispatch through it (the new transformer models); the UNets of SD 1.x/2.x/XL run `AttnProcessor2_0`, which calls
PyTorch's `scaled_dot_product_attention` directly, so their switch is the processor (eager / SDPA / xformers)
and, for SDPA, PyTorch's kernel choice (`torch.nn.attention.sdpa_kernel`).
"""

from __future__ import annotations

from sdlora.errors import SdloraError, cause

# --attention NAME -> what it is (for --help); "sdpa" is what diffusers uses when nothing is set
ATTENTION = {
    "sdpa": "PyTorch scaled_dot_product_attention, kernel picked by PyTorch",
    "flash": "SDPA restricted to its FlashAttention kernel (CUDA fp16/bf16, or CPU)",
    "efficient": "SDPA restricted to its memory-efficient kernel (CUDA)",
    "cudnn": "SDPA restricted to its cuDNN kernel (CUDA)",
    "math": "SDPA restricted to its plain math kernel (any device; the reference)",
    "eager": "diffusers' AttnProcessor: matmul + softmax in Python (any device; most memory)",
    "xformers": "xformers' memory-efficient attention (pip install xformers; CUDA)",
}
_SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def check_compile(device) -> None:
    """Refuse --compile where torch.compile's inductor cannot build kernels, before the model loads: on CPU it
    needs a C++ compiler, on CUDA the triton package."""
    if device.type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:
            wanted = next((c for c in reversed(tuple(config.cpp.cxx)) if c), "g++")
            raise SdloraError(f"--compile on CPU needs a C++ compiler ({wanted} was not found): install one (e.g. "
                              "`apt install g++`, or set CXX to its path), or train without --compile") from None
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise SdloraError("--compile on CUDA needs the triton package: `pip install triton` (it comes with the "
                              "Linux CUDA wheels of torch), or train without --compile")


def compile_error(e: BaseException) -> SdloraError | None:
    """A one-line error for a failure inside torch.compile (None: `e` is something else)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError
    except ImportError:  # pragma: no cover - every torch sdlora supports has both
        return None
    if not isinstance(e, (TorchDynamoException, InductorError)):
        return None
    return SdloraError(f"torch.compile failed ({type(e).__name__}: {cause(e)}); train without --compile")


# --attention NAME -> diffusers' attention-dispatch backend, for the denoisers whose processors dispatch through
# it (SD 3.x / FLUX.1 transformers); "eager" has none there
_DISPATCH = {"sdpa": "native", "flash": "_native_flash", "efficient": "_native_efficient", "cudnn": "_native_cudnn",
             "math": "_native_math", "xformers": "xformers"}


def set_attention(denoiser, name: str, device) -> None:
    """Install attention `name` (a key of ATTENTION) in `denoiser`'s attention layers (the text encoders keep
    theirs)."""
    if name == "sdpa":  # what diffusers runs when nothing is set
        return
    if any(hasattr(p, "_attention_backend") for p in denoiser.attn_processors.values()):  # the transformers
        if name in ("efficient", "cudnn", "xformers") and device.type != "cuda":
            raise SdloraError(f"--attention {name} needs a CUDA GPU; on CPU use --attention sdpa, flash or math")
        if name not in _DISPATCH:
            raise SdloraError(f"--attention {name} is for the UNet models; use one of "
                              f"{', '.join(_DISPATCH)} with this transformer")
        denoiser.set_attention_backend(_DISPATCH[name])
        return
    if name in _SDPA_KERNELS:
        if name in ("efficient", "cudnn") and device.type != "cuda":
            raise SdloraError(f"--attention {name} needs a CUDA GPU; on CPU use --attention sdpa, flash or math")
        denoiser.set_attn_processor(_kernel_processor(name))
    elif name == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        denoiser.set_attn_processor(AttnProcessor())
    elif name == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise SdloraError("--attention xformers needs the xformers package: `pip install xformers`, or use "
                              "--attention sdpa (the default)") from None
        if device.type != "cuda":
            raise SdloraError("--attention xformers needs a CUDA GPU; on CPU use --attention sdpa or math")
        denoiser.enable_xformers_memory_efficient_attention()


def _kernel_processor(name: str):
    """diffusers' SDPA processor with PyTorch's kernel choice restricted to kernel `name` around each call."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA_KERNELS[name])

    class KernelAttnProcessor(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with sdpa_kernel(backend):
                return super().__call__(*args, **kwargs)

    return KernelAttnProcessor()


def channels_last(denoiser) -> None:
    """The denoiser's 4-D weights in channels-last (NHWC) layout: faster convolutions on tensor-core GPUs with
    fp16/bf16; usually slower on CPU (benchmarks/bench_train.py)."""
    import torch

    denoiser.to(memory_format=torch.channels_last)
