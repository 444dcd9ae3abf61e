"""`--captioner blip`: BLIP image captioning through transformers (BlipForConditionalGeneration), as kohya's
make_captions.py uses it; short sentences ("a purple triangle on a gray background")."""

from __future__ import annotations

from sdlora.caption.hf import load_pretrained, new_tokens
from sdlora.caption.options import Options

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


class BlipCaptioner:
    sep = " "

    def __init__(self, model: str, opts: Options):
        self.processor, self.net, self.device = load_pretrained("BlipForConditionalGeneration", model, opts.device,
                                                                "BLIP", DEFAULT_MODEL)
        self.opts, self.what = opts, f"BLIP ({model})"

    def caption(self, images) -> list[str]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.net.generate(**inputs, max_new_tokens=new_tokens(self.net, self.opts.max_new_tokens))
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load(model: str | None, opts: Options) -> BlipCaptioner:
    return BlipCaptioner(model or DEFAULT_MODEL, opts)
