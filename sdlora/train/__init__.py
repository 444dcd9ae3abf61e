"""Training: the run (loop.py, its phases in prepare.py, caches.py, trainable.py, export.py), the math of a step
(step.py), checkpoints, class images and monitoring.

Light at import: `sdlora.config` imports `sdlora.train.optim` for validation, which must not load torch."""


def __getattr__(name: str):
    # torch dtype of each precision name: --save-precision takes these names; --mixed-precision says "no" for fp32
    if name == "DTYPES":
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    raise AttributeError(f"module 'sdlora.train' has no attribute {name!r}")
