"""Training: the loop (loop.py), the math of a step (step.py), checkpoints, class images and monitoring."""

import torch

# torch dtype of each precision name: --save-precision takes these names; --mixed-precision says "no" for fp32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
