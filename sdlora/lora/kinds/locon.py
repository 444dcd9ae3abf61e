"""locon: LoRA on the UNet's kxk convolutions too (ResNet blocks, down/up-samplers), LyCORIS's LoCon.

The same down/up pair as `lora` (a kxk conv: down [r, in, k, k], up [out, r, 1, 1]; Tucker: + mid), trained with
the same PEFT layers; what differs is that it adapts the convs by default (at `--conv-rank`/`--conv-alpha`) and that
LyCORIS's module writes it (`algo=locon`).
"""

from __future__ import annotations

from sdlora.lora.kinds.lora import PeftLoRA

SPEC = PeftLoRA("locon", help="LoRA + the UNet's 3x3 convs", roles=("down", "up"), pair=True, plain_pair=True,
                trainable=True, convs=True, takes_dora=True, algo="locon")
