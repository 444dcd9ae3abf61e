"""AUTOMATIC1111's `parameters` text, the PNG text chunk every SD tool reads: prompt with <lora:name:s> tags,
a 'Negative prompt:' line, and a 'Key: value, ...' line (A1111 modules/infotext_utils.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from sdlora.errors import SdloraError
from sdlora.formats import file_io


@dataclass
class LoraRef:
    name: str
    te: float
    unet: float
    hash: str = ""

    def tag(self) -> str:
        """A1111 prompt syntax: <lora:name:s>, or <lora:name:te:unet> when the two differ."""
        if self.te == self.unet:
            return f"<lora:{self.name}:{_num(self.te)}>"
        return f"<lora:{self.name}:{_num(self.te)}:{_num(self.unet)}>"


@dataclass
class ImageParams:
    prompt: str
    negative: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    loras: list[LoraRef] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # other "Key: value" fields (e.g. Version)


def _num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _quote(text: str) -> str:
    """A1111's quoting of a field value: JSON-quoted when it holds ',', ':', '"' or a newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def _unquote(text: str) -> str:
    if text.startswith('"') and text.endswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([^:>]+)(?::([^:>]+))?>")


def format_parameters(p: ImageParams) -> str:
    """The A1111 `parameters` text: prompt with <lora:..> tags, 'Negative prompt:' line, 'Key: value, ...' line."""
    prompt = " ".join([p.prompt] + [l.tag() for l in p.loras]) if p.loras else p.prompt
    fields = {"Steps": str(p.steps), "Sampler": p.sampler, "CFG scale": _num(p.cfg), "Seed": str(p.seed),
              "Size": f"{p.width}x{p.height}"}
    if "Model hash" in p.extra:  # A1111's order: Model hash, then Model
        fields["Model hash"] = p.extra["Model hash"]
    fields["Model"] = p.model
    if p.loras:
        fields["Lora hashes"] = ", ".join(f"{l.name}: {l.hash}" for l in p.loras)
    fields.update({k: v for k, v in p.extra.items() if k not in fields})
    lines = [prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> ImageParams:
    """Read an A1111 `parameters` text (as written by A1111 or by format_parameters) back."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        fields = {k: _unquote(v) for k, v in _FIELD.findall(lines.pop())}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    prompt_text = "\n".join(prompt)
    hashes = {}
    for item in fields.pop("Lora hashes", "").split(","):
        if ":" in item:
            n, h = item.rsplit(":", 1)
            hashes[n.strip()] = h.strip()
    loras = []
    for m in _LORA_TAG.finditer(prompt_text):
        te = float(m.group(2))
        loras.append(LoraRef(m.group(1), te, float(m.group(3)) if m.group(3) else te, hashes.get(m.group(1), "")))
    prompt_text = _LORA_TAG.sub("", prompt_text)
    w, _, h = fields.pop("Size", "512x512").partition("x")
    return ImageParams(prompt=prompt_text, negative="\n".join(negative), steps=int(fields.pop("Steps", 20)),
                       sampler=fields.pop("Sampler", ""), cfg=float(fields.pop("CFG scale", 7)),
                       seed=int(fields.pop("Seed", 0)), width=int(w), height=int(h), model=fields.pop("Model", ""),
                       loras=loras, extra=fields)


def read_parameters(path) -> ImageParams:
    """The `parameters` chunk of a PNG, parsed."""
    text = file_io.png_text(path).get("parameters")
    if text is None:
        raise SdloraError(f"{path}: PNG has no 'parameters' text chunk")
    return parse_parameters(text)
