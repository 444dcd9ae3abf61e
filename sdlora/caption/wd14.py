"""`--captioner wd14`: WD14-style taggers (SmilingWolf's wd-v1-4 / wd-v3 ONNX models) through onnxruntime, the
optional extra `pip install 'sdlora[caption]'`. A model is a folder (or hub repo) holding `model.onnx` and
`selected_tags.csv` (tag_id,name,category,count; category 0 = general, 4 = character, 9 = rating). The caption is
the character tags at or above --character-threshold, then the general tags at or above --threshold, each by
probability, highest first, comma-separated; ratings are left out. Underscores become spaces except in kaomoji."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sdlora.caption.options import Options
from sdlora.errors import SdloraError, cause

DEFAULT_MODEL = "SmilingWolf/wd-v1-4-moat-tagger-v2"
MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
GENERAL, CHARACTER = 0, 4
DEFAULT_SIZE = 448  # the taggers' input side, when a model does not fix it
# tags that are faces drawn with an underscore: kept as they are (kohya's tagger keeps the same list)
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
           "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
INSTALL = "pip install 'sdlora[caption]' (or pip install onnxruntime)"


def _files(model: str) -> tuple[Path, Path]:
    """model.onnx and selected_tags.csv of a local folder, or of a hub repo (downloaded to the hub cache)."""
    folder = Path(model)
    if folder.is_dir():
        paths = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise SdloraError(f"--captioner-model {model}: no {' or '.join(missing)} in it; a WD14 tagger folder "
                              f"holds {MODEL_FILE} and {TAGS_FILE}")
        return paths
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, MODEL_FILE)), Path(hf_hub_download(model, TAGS_FILE))
    except Exception as e:  # not a repo id, offline, no such file: the hub raises several types
        raise SdloraError(f"--captioner-model {model}: cannot get {MODEL_FILE} and {TAGS_FILE} ({cause(e)}); pass "
                          f"a hub repo such as {DEFAULT_MODEL} or a local folder holding both") from e


def _tags(path: Path) -> list[tuple[str, int]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [(r["name"], int(r["category"])) for r in rows]
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise SdloraError(f"{path}: not a tagger's tag list ({cause(e)}); it needs the columns name and category "
                          "(0 general, 4 character, 9 rating)") from e


def tag_text(name: str) -> str:
    return name if name in KAOMOJI else name.replace("_", " ")


class Wd14Captioner:
    sep = ", "  # tags: cut at tag boundaries

    def __init__(self, model: str, opts: Options):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise SdloraError(f"the wd14 captioner needs onnxruntime, which is not installed; {INSTALL}") from e
        onnx_path, tags_path = _files(model)
        self.tags = _tags(tags_path)
        gpu = opts.device is None or opts.device.startswith("cuda")  # None: a GPU when onnxruntime has one
        providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=[
                p for p in providers if p in ort.get_available_providers()])
        except Exception as e:  # onnxruntime raises its own types for a corrupt or unsupported model
            raise SdloraError(f"{onnx_path}: onnxruntime cannot load it ({cause(e)}); pass a WD14 tagger's "
                              "model.onnx") from e
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[3] != 3:
            raise SdloraError(f"{onnx_path}: its input is {inp.shape}, not images [batch, height, width, 3] as a "
                              "WD14 tagger's")
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise SdloraError(f"{tags_path}: {len(self.tags)} tags for a model with {n_out} outputs; use the tag "
                              "list of this model")
        self.input_name = inp.name
        self.size = inp.shape[1] if isinstance(inp.shape[1], int) else DEFAULT_SIZE
        self.one_at_a_time = inp.shape[0] == 1  # a model exported with a fixed batch of one
        self.opts, self.what = opts, f"WD14 tagger ({model})"

    def _pixels(self, im) -> np.ndarray:
        """As the taggers were trained: padded to a square on white, resized to the model's side, BGR, 0..255."""
        from PIL import Image

        side = max(im.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def _caption(self, probs: np.ndarray) -> str:
        o = self.opts
        chosen = [(p, name, cat) for p, (name, cat) in zip(probs.tolist(), self.tags)
                  if (cat == CHARACTER and p >= o.character_threshold) or (cat == GENERAL and p >= o.threshold)]
        chosen.sort(key=lambda t: (t[2] != CHARACTER, -t[0]))  # characters first, then by probability
        return ", ".join(tag_text(name) for _, name, _ in chosen)

    def caption(self, images) -> list[str]:
        batch = np.stack([self._pixels(im) for im in images])
        chunks = [batch[i:i + 1] for i in range(len(batch))] if self.one_at_a_time else [batch]
        probs = np.concatenate([self.session.run(None, {self.input_name: c})[0] for c in chunks])
        return [self._caption(p) for p in probs]


def load(model: str | None, opts: Options) -> Wd14Captioner:
    return Wd14Captioner(model or DEFAULT_MODEL, opts)
