"""The Train tab's dataset: a folder under --data-root, or images uploaded into a job's own folder; and what
`sdlora scan` reports about it, with thumbnails.

Path rule: a folder a page names is taken only inside --data-root (after links and `..` are followed); anything
else is refused before the folder is looked at, with a message that does not depend on whether it exists.
Uploads are images and caption files only, each at most MAX_FILE_BYTES, at most MAX_FILES and MAX_JOB_BYTES a job.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.data.captions import CAPTION_SUFFIXES
from sdlora.data.images import IMAGE_SUFFIXES
from sdlora.errors import SdloraError
from sdlora.guard import same_or_inside

MAX_FILE_BYTES = 50 << 20  # one uploaded image or caption file
MAX_FILES = 500  # files in one job's upload folder
MAX_JOB_BYTES = 2 << 30  # bytes in one job's upload folder
MAX_THUMBS = 60  # thumbnails shown
THUMB = 128  # px, the longer side
UPLOAD_SUFFIXES = tuple(sorted(IMAGE_SUFFIXES)) + CAPTION_SUFFIXES


def folder_in_root(text: str, root: Path | None) -> Path:
    """The folder `text` names (relative to `root`, or absolute), when it lies inside `root`. Refused without
    looking at it otherwise (nothing read or written; the message is the same whether it exists or not)."""
    text = (text or "").strip()
    if root is None:
        raise SdloraError("this app takes no server folders (it was started without --data-root); upload the images "
                          "instead")
    path = (root / text) if text else root
    if not same_or_inside(path, root):
        raise SdloraError(f"'{text}' is not inside the app's --data-root; name a folder under it (relative paths "
                          "are taken from it)")
    path = path.resolve()
    if not path.is_dir():
        raise SdloraError(f"'{text}' is not a folder under --data-root")
    return path


def safe_name(name: str) -> str:
    """An uploaded file's name, reduced to a plain file name (no folders, no control or odd characters)."""
    stem, suffix = Path(Path(name).name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^\w.\- ]+", "_", stem).strip(" .") or "file"
    return stem[:100] + suffix


def take_uploads(paths: list, folder: Path) -> list[str]:
    """Move uploaded temp files into a job's upload `folder` (the temp files are deleted in every case); a line per
    file refused, and the count taken."""
    folder.mkdir(parents=True, exist_ok=True)
    held = [p for p in folder.iterdir() if p.is_file()]
    count, size, taken, notes = len(held), sum(p.stat().st_size for p in held), 0, []
    for raw in paths or []:
        src = Path(raw)
        name = safe_name(src.name)
        try:
            if src.suffix.lower() not in UPLOAD_SUFFIXES:
                notes.append(f"{name}: not an image or caption file ({', '.join(UPLOAD_SUFFIXES)})")
                continue
            n = src.stat().st_size
            if n > MAX_FILE_BYTES:
                notes.append(f"{name}: {n / 2**20:,.1f} MiB is more than the {MAX_FILE_BYTES >> 20} MiB a file may be")
                continue
            if count >= MAX_FILES and not (folder / name).is_file():
                notes.append(f"{name}: a job holds at most {MAX_FILES} files")
                continue
            if size + n > MAX_JOB_BYTES:
                notes.append(f"{name}: a job's uploads may total {MAX_JOB_BYTES >> 30} GiB")
                continue
            dest = folder / name
            old = dest.stat().st_size if dest.is_file() else None  # the same name again replaces the file
            shutil.copyfile(src, dest)
            count, size, taken = count + (old is None), size + n - (old or 0), taken + 1
        finally:
            src.unlink(missing_ok=True)
    return notes + [f"{taken} file(s) added; the job's folder holds {len(list(folder.iterdir()))}"]


@dataclass
class Report:
    """What `sdlora scan` says about a folder, and thumbnails: (PIL image, caption line)."""

    lines: list[str]
    thumbs: list = field(default_factory=list)
    uncaptioned: int = 0  # images without a caption file
    stops: str | None = None  # why training would stop, None when it would start

    @property
    def text(self) -> str:
        head = f"**Training would stop:** {self.stops}\n\n" if self.stops else ""
        return head + "```\n" + "\n".join(self.lines) + "\n```"


def scan(folder: Path, prompt: str | None, resolution: int, buckets: bool = False, class_prompt: str | None = None,
         trigger: str | None = None, repeats: int = 1) -> Report:
    """`sdlora scan`'s report of `folder` (concepts, each image with its size and caption, the problems), without
    loading a model, and a thumbnail per image."""
    from PIL import Image

    from sdlora.data.kohya_folders import scan_dataset
    from sdlora.data.scan_command import report

    try:
        ds = scan_dataset(folder)
        lines = report(ds, resolution, buckets, prompt, repeats, class_prompt, trigger)
    except SdloraError as e:
        return Report([str(e)], stops=str(e))
    stops = None
    try:
        ds.check(prompt, log=lambda *_: None, repeats=repeats)
    except SdloraError as e:
        stops = str(e)
    lines = [line.replace(str(folder), folder.name) for line in lines]  # no server path on the page
    thumbs, uncaptioned = [], 0
    from sdlora.data.captions import read_caption

    for c in ds.concepts:
        for p in c.images:
            caption = read_caption(p)
            uncaptioned += caption is None
            if len(thumbs) < MAX_THUMBS:
                try:
                    with Image.open(p) as im:
                        thumbs.append((thumbnail(im), f"{p.name} {im.width}x{im.height}: "
                                       + (caption or f"(no caption: '{prompt or '?'}')")))
                except OSError:
                    thumbs.append((Image.new("RGB", (THUMB, THUMB), "gray"), f"{p.name}: cannot read it"))
    return Report(lines, thumbs, uncaptioned, stops)


def thumbnail(im):
    """`im` at THUMB px on its longer side: small images (toy's 32 px) enlarged as pixels, large ones reduced."""
    from PIL import Image

    k = THUMB / max(im.size)
    size = (max(1, round(im.width * k)), max(1, round(im.height * k)))
    return im.convert("RGB").resize(size, Image.Resampling.NEAREST if k > 1 else Image.Resampling.LANCZOS)


def captioner():
    """`sdlora caption`'s Python form, `caption_folder(folder, captioner, prefix, ...)`, with the captioners it
    offers; None where this install lacks it. The tab offers it on an upload folder whose images lack captions."""
    try:
        from sdlora.caption import caption_folder
        from sdlora.caption.command import CAPTIONERS
    except ImportError:
        return None
    return caption_folder, tuple(CAPTIONERS)
