"""The built-in offline model `toy`: a small text-to-image model pretrained on a synthetic world.

`sdlora/toy/base/` is a diffusers StableDiffusionPipeline folder (safetensors only): a factor-4 AutoencoderKL
(32 px images <-> 4×8×8 latents), a 2-layer CLIP text encoder with a word-level tokenizer, and a
UNet2DConditionModel with cross-attention (so sdlora's LoRA presets apply as on SD 1.5). It was trained from
scratch by `python -m sdlora.toy pretrain` on renders of the toy world (`sdlora/toy/world.py`): one coloured
shape on a plain background, captioned "a red circle on a black background". Some subjects are held out of
pretraining (a purple triangle; any ring) so DreamBooth has something new to teach; `sdlora/eval/toy_judge.py`
tells what a generated image shows, and `sdlora/eval/toy_score.py` measures prompt and subject fidelity.
"""

from __future__ import annotations

import json
from pathlib import Path

TOY_RESOLUTION = 32
TOY_ARCH = "sd1"  # its module tree is SD 1.x-shaped (fewer blocks), so SD 1.x names and presets apply
BASE_DIR = Path(__file__).parent / "base"


def toy_components(path: str | Path = BASE_DIR) -> dict:
    """UNet, text encoder, tokenizer, VAE and scheduler config of the pretrained toy base (fp32, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdlora.errors import SdloraError

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise SdloraError(f"{path}: the toy base model is missing; run `python -m sdlora.toy pretrain` to rebuild it")
    sched_cfg = {k: v for k, v in json.loads((path / "scheduler" / "scheduler_config.json").read_text()).items()
                 if not k.startswith("_")}
    return {
        "unet": UNet2DConditionModel.from_pretrained(path / "unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer"),
        "vae": AutoencoderKL.from_pretrained(path / "vae").eval(),
        "scheduler_config": sched_cfg,
    }
