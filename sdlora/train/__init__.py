"""Training: the loop (loop.py), the loss of one step (step.py), checkpoints, class images and monitoring."""

import torch

# --save-precision value -> dtype of the saved tensors
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
