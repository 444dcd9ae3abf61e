"""`--captioner florence2`: Florence-2 through transformers (Florence2ForConditionalGeneration, the checkpoints
converted for it such as florence-community/Florence-2-large); `--florence-task` picks the caption task:
<CAPTION> (one line), <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION> (a paragraph)."""

from __future__ import annotations

from sdlora.caption.hf import load_pretrained, new_tokens
from sdlora.caption.options import Options

DEFAULT_MODEL = "florence-community/Florence-2-large"
TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")


class Florence2Captioner:
    sep = " "

    def __init__(self, model: str, opts: Options):
        self.processor, self.net, self.device = load_pretrained("Florence2ForConditionalGeneration", model, opts.device,
                                                                "Florence-2", DEFAULT_MODEL)
        self.opts, self.what = opts, f"Florence-2 ({model}, {opts.florence_task})"

    def caption(self, images) -> list[str]:
        import torch

        images = list(images)
        # the processor turns the task token into its question ("Describe in detail what is shown in the image.")
        inputs = self.processor(text=[self.opts.florence_task] * len(images), images=images,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.net.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                    attention_mask=inputs.get("attention_mask"),
                                    max_new_tokens=new_tokens(self.net, self.opts.max_new_tokens), num_beams=3,
                                    do_sample=False)
        # a caption task's answer is plain text: with the special tokens (<s>, </s>, <pad>) dropped it is what
        # the processor's post_process_generation returns for it
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def load(model: str | None, opts: Options) -> Florence2Captioner:
    return Florence2Captioner(model or DEFAULT_MODEL, opts)
