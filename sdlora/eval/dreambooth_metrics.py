"""DreamBooth's subject- and prompt-fidelity metrics for real models: CLIP-I, CLIP-T and DINO (Ruiz et al. 2023).

- CLIP-I: mean cosine similarity of CLIP image embeddings, generated vs. real subject images (all pairs).
- DINO: the same with DINO ViT-S/16 CLS embeddings (more sensitive to the subject's identity than CLIP).
- CLIP-T: mean cosine similarity of each generated image with its prompt (trigger word removed).

The feature models are read from the local Hugging Face cache or a folder only (never downloaded here); when one
is missing its metric is skipped with a one-line reason. Preprocessing is done here (resize, centre crop,
normalise) so no torchvision is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlora.errors import cause

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32
DEFAULT_DINO = "facebook/dino-vits16"  # the paper's DINO ViT-S/16
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LIVE_CLASSES = {"dog", "cat"}  # the DreamBooth dataset's live subjects use the live-subject prompt list


def dreambooth_prompts(prompts_file: Path, live: bool) -> list[str]:
    """The 25 evaluation prompt templates ('a {0} {1} in the jungle', ...) of the DreamBooth dataset."""
    text = Path(prompts_file).read_text(encoding="utf-8")
    part = text.split("Live Subject Prompts")[1 if live else 0]
    return re.findall(r"'(a [^']*\{0\} \{1\}[^']*)'", part)


def _pixels(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    out = []
    for im in images:
        im = im.convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.Resampling.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(arr) - torch.tensor(mean)) / torch.tensor(std))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def _features(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return x.pooler_output if getattr(x, "pooler_output", None) is not None else x[0]


def _normed(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why


class FeatureModels:
    """CLIP and DINO, loaded from local files only; a missing one is recorded, not fatal."""

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO):
        from transformers import AutoModel, CLIPModel, CLIPTokenizer

        self.skipped: dict[str, str] = {}
        self.clip = self.clip_tok = self.dino = None
        try:
            self.clip = CLIPModel.from_pretrained(clip, local_files_only=True).eval()
            self.clip_tok = CLIPTokenizer.from_pretrained(clip, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            why = (f"CLIP model {clip!r} not available locally ({cause(e, 160)}); "
                   "download it once or pass --clip-model DIR")
            self.skipped |= {"CLIP-I": why, "CLIP-T": why}
        try:
            self.dino = AutoModel.from_pretrained(dino, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001
            self.skipped["DINO"] = f"DINO model {dino!r} not available locally ({cause(e, 160)}); pass --dino-model DIR"

    @torch.no_grad()
    def clip_images(self, images) -> torch.Tensor:
        size = self.clip.config.vision_config.image_size
        return _normed(_features(self.clip.get_image_features(pixel_values=_pixels(images, size, CLIP_MEAN, CLIP_STD))))

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.clip_tok(texts, padding=True, truncation=True, return_tensors="pt")
        return _normed(_features(self.clip.get_text_features(**ids)))

    @torch.no_grad()
    def dino_images(self, images) -> torch.Tensor:
        size = self.dino.config.image_size
        out = self.dino(pixel_values=_pixels(images, size, IMAGENET_MEAN, IMAGENET_STD))
        return _normed(out.last_hidden_state[:, 0])

    def score(self, generated: dict[str, list[Image.Image]], references: list[Image.Image]) -> Scores:
        """`generated`: prompt (without the trigger) -> images; `references`: the real subject images."""
        s = Scores(skipped=dict(self.skipped))
        images = [im for ims in generated.values() for im in ims]
        if self.clip is not None:
            s.values["CLIP-I"] = (self.clip_images(images) @ self.clip_images(references).T).mean().item()
            sims = []
            for prompt, ims in generated.items():
                sims.append((self.clip_images(ims) @ self.clip_texts([prompt]).T).flatten())
            s.values["CLIP-T"] = torch.cat(sims).mean().item()
        if self.dino is not None:
            s.values["DINO"] = (self.dino_images(images) @ self.dino_images(references).T).mean().item()
        return s
