"""`sdlora caption DIR`: write a caption file (`name.txt`) beside each image of a folder that has none, with a
captioning model; `caption_folder` is the same as a Python function (the app calls it).

DIR is a folder of images or a kohya-style parent of `N_words` folders, read as `sdlora train --images` reads it
(sdlora/data/kohya_folders.py): every image is decoded first, and unreadable ones are refused in one line (or
skipped with --skip-bad-images). An image that already has a caption (`.txt` or `.caption`) keeps it unless
--overwrite is given, and the summary says how many were kept or replaced. Each caption is written atomically
(a temp file renamed into place), so an interrupted run leaves whole files and a rerun captions only the rest.
--prefix (a trigger) goes first, joined by ", "; --max-tokens cuts each caption (prefix included) to at most
that many CLIP tokens at a word or tag boundary.

Captioners (one module each, imported only when used): toy (the toy world's judge, offline), blip and florence2
(transformers), wd14 (ONNX taggers through onnxruntime, the optional extra `sdlora[caption]`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.caption.options import Options
from sdlora.data.captions import CAPTION_SUFFIXES
from sdlora.data.images import decode, display_name, refuse_or_skip_bad
from sdlora.errors import SdloraError

CAPTIONERS = {"toy": "sdlora.caption.toy", "blip": "sdlora.caption.blip", "florence2": "sdlora.caption.florence2",
              "wd14": "sdlora.caption.wd14"}
FLORENCE_TASKS = {"caption": "<CAPTION>", "detailed": "<DETAILED_CAPTION>",
                  "more-detailed": "<MORE_DETAILED_CAPTION>"}
DEFAULT_MAX_TOKENS = 75  # what a CLIP text encoder's 77-token window reads of a caption (less its start/end tokens)
CAPTION_SUFFIX = ".txt"


@dataclass
class CaptionReport:
    """What `caption_folder` did: captions written ({caption file: text}), the caption files left as they were, the
    existing captions replaced (--overwrite), the unreadable images skipped, the images sharing another's caption
    file, and how many captions were cut to --max-tokens."""

    written: dict[Path, str] = field(default_factory=dict)
    kept: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)
    shared: list[Path] = field(default_factory=list)  # images whose caption file is another image's (a.png, a.jpg)
    cut: int = 0
    captioner: str = ""

    def summary(self) -> str:
        parts = [f"wrote {len(self.written)} caption file(s) with {self.captioner}" if self.written
                 else "wrote no caption files"]
        if self.replaced:
            parts.append(f"replaced {len(self.replaced)} existing caption(s) (--overwrite)")
        if self.kept:
            parts.append(f"left {len(self.kept)} image(s) that already have a caption as they were (pass "
                         "--overwrite to replace them)")
        if self.cut:
            parts.append(f"{self.cut} cut to --max-tokens")
        empty = sum(not t for t in self.written.values())
        if empty:
            parts.append(f"{empty} empty (the captioner said nothing: training uses --prompt for them)")
        if self.bad:
            parts.append(f"skipped {len(self.bad)} unreadable image(s)")
        if self.shared:
            parts.append(f"{len(self.shared)} image(s) share a caption file with an image of the same name "
                         f"({display_name(self.shared[0])}: {display_name(self.shared[0].with_suffix(CAPTION_SUFFIX))})"
                         "; training reads that one caption for both, so rename them to caption them apart")
        return "; ".join(parts)


def existing_caption(image: Path) -> Path | None:
    """The caption file training would read for `image` (sdlora.data.captions.read_caption), if there is one."""
    return next((image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()), None)


def _check(captioner: str, model: str | None, prefix: str, max_tokens: int, batch_size: int, opts: Options) -> None:
    from sdlora.data.tokens import token_count

    if captioner not in CAPTIONERS:
        raise SdloraError(f"--captioner {captioner}: no such captioner; use one of {', '.join(CAPTIONERS)}")
    if captioner == "toy" and model:
        raise SdloraError("--captioner toy has no model to choose; drop --captioner-model")
    if model and model.startswith(("/", "./", "../", "~")) and not Path(model).is_dir():
        raise SdloraError(f"--captioner-model {model}: no such folder; pass a hub id (owner/name) or a folder "
                          "holding the model")
    if max_tokens < 0:
        raise SdloraError(f"--max-tokens must be 0 (no limit) or more, got {max_tokens}")
    if batch_size < 1:
        raise SdloraError(f"--batch-size must be at least 1, got {batch_size}")
    for name, v in (("--threshold", opts.threshold), ("--character-threshold", opts.character_threshold)):
        if not 0 <= v <= 1:
            raise SdloraError(f"{name} is a probability between 0 and 1, got {v}")
    if opts.florence_task not in FLORENCE_TASKS.values():
        raise SdloraError(f"--florence-task {opts.florence_task}: use one of {', '.join(FLORENCE_TASKS)}")
    if prefix and max_tokens and token_count(prefix) >= max_tokens:
        raise SdloraError(f"--prefix '{prefix}' is {token_count(prefix)} CLIP tokens, leaving nothing of "
                          f"--max-tokens {max_tokens} for the caption; shorten it or raise --max-tokens")


def _images(folder: Path, skip_bad: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    from sdlora.data.kohya_folders import scan_folder

    if not folder.is_dir():
        raise SdloraError(f"{display_name(folder, full=True)}: no such folder; pass a folder of images (or of kohya "
                          "N_words folders)")
    concepts, _ = scan_folder(folder)
    images = [p for c in concepts for p in c.images]
    bad = [b for c in concepts for b in c.bad]
    refuse_or_skip_bad(folder, bad, skip_bad)
    if not images:
        raise SdloraError(f"{display_name(folder, full=True)} has no images to caption; add .jpg/.png/.webp files "
                          "(or N_words folders holding them)")
    return images, bad


def _write(path: Path, text: str) -> None:
    from sdlora.formats.file_io import atomic_write

    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    except OSError as e:
        raise SdloraError(f"{display_name(path, full=True)}: cannot write it ({e.strerror or e}); check the "
                          "folder's permissions and free space (the captions written so far are kept)") from e


def caption_folder(folder, captioner: str = "toy", prefix: str | None = None, overwrite: bool = False,
                   max_tokens: int = DEFAULT_MAX_TOKENS, model: str | None = None, batch_size: int = 1,
                   device: str | None = None, skip_bad_images: bool = False, threshold: float = 0.35,
                   character_threshold: float = 0.85, florence_task: str = "detailed", progress: bool = True,
                   log=print) -> CaptionReport:
    """Caption every image of `folder` that has no caption file (all of them with `overwrite`): writes
    `image.txt` beside each, atomically, and returns what it did (`CaptionReport.written`: {caption file: text}).
    `captioner`: toy, blip, florence2 or wd14; `model`: its hub id or local folder (None: the default one);
    `prefix` goes first, joined by ", "; `max_tokens` (0: no limit) cuts each caption, prefix included, to that
    many CLIP tokens at a word or tag boundary. One-line SdloraError on bad input, before any model loads."""
    from tqdm.auto import tqdm

    from sdlora.data.tokens import fit, token_count

    prefix = (prefix or "").strip().rstrip(",").strip()
    opts = Options(device=device, max_new_tokens=max_tokens + 10 if max_tokens else 256,
                   florence_task=FLORENCE_TASKS.get(florence_task, florence_task), threshold=threshold,
                   character_threshold=character_threshold)
    _check(captioner, model, prefix, max_tokens, batch_size, opts)
    folder = Path(folder)
    images, bad = _images(folder, skip_bad_images)
    report = CaptionReport(bad=bad if skip_bad_images else [])
    todo, claimed = [], set()
    for image in images:
        if image.with_suffix(CAPTION_SUFFIX) in claimed:  # a.png and a.jpg: training reads a.txt for both
            report.shared.append(image)
            continue
        claimed.add(image.with_suffix(CAPTION_SUFFIX))
        have = existing_caption(image)
        if have is not None and not overwrite:
            report.kept.append(have)
        else:
            todo.append(image)
            if have is not None:
                report.replaced.append(have)
    report.captioner = captioner
    if not todo:
        log(report.summary())
        return report
    cap = importlib.import_module(CAPTIONERS[captioner]).load(model, opts)
    report.captioner = cap.what
    with tqdm(total=len(todo), desc="captioning", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = cap.caption([decode(p) for p in batch])  # decode: EXIF-oriented RGB, as training reads it
            for image, text in zip(batch, texts):
                parts = [t.strip() for t in text.split(cap.sep.strip() or None) if t.strip()]
                full = ", ".join(t for t in (prefix, cap.sep.join(parts)) if t)
                if max_tokens and token_count(full) > max_tokens:
                    full = fit(parts, cap.sep, max_tokens, head=prefix)
                    report.cut += 1
                out = image.with_suffix(CAPTION_SUFFIX)
                _write(out, full)
                report.written[out] = full
            bar.update(len(batch))
    log(report.summary())
    return report


def add_caption_args(p) -> None:
    p.add_argument("dir", help="folder of images (or a kohya parent of N_words folders), as `sdlora train --images`")
    p.add_argument("--captioner", required=True, choices=list(CAPTIONERS),
                   help="toy: the toy world's judge (offline, names colour/shape/background); blip, florence2: "
                        "captioning models through transformers; wd14: anime taggers through onnxruntime "
                        "(pip install 'sdlora[caption]')")
    p.add_argument("--captioner-model", metavar="ID|DIR",
                   help="hub id or local folder of the model (default: Salesforce/blip-image-captioning-large, "
                        "florence-community/Florence-2-large, SmilingWolf/wd-v1-4-moat-tagger-v2)")
    p.add_argument("--prefix", metavar="TEXT", help="put first in every caption, joined by ', ' (e.g. the trigger)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="cut each caption, prefix included, to at most N CLIP tokens at a word or tag boundary "
                        f"(default: {DEFAULT_MAX_TOKENS}, what CLIP's 77-token window reads less its start and end "
                        "tokens; 0: no limit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing captions (without it, images that have a .txt or .caption keep it)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per model call (default: 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    p.add_argument("--florence-task", choices=list(FLORENCE_TASKS), default="detailed",
                   help="florence2: caption (one line), detailed or more-detailed (a paragraph) (default: detailed)")
    p.add_argument("--threshold", type=float, default=0.35,
                   help="wd14: keep general tags at or above this probability (default: 0.35)")
    p.add_argument("--character-threshold", type=float, default=0.85,
                   help="wd14: keep character tags at or above this probability (default: 0.85)")


def cmd_caption(args) -> int:
    caption_folder(args.dir, args.captioner, prefix=args.prefix, overwrite=args.overwrite, max_tokens=args.max_tokens,
                   model=args.captioner_model, batch_size=args.batch_size, device=args.device,
                   skip_bad_images=args.skip_bad_images, threshold=args.threshold,
                   character_threshold=args.character_threshold, florence_task=args.florence_task)
    return 0
