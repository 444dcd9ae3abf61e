"""Datasets as users keep them: a plain folder of images, or kohya's concept folders; what training and
`sdlora scan` (data/scan_command.py) both read.

`--images` (and `--class-images`) is either a plain folder of images, or a kohya-style parent folder whose
subfolders are named `N_words`: each is a concept trained N times per epoch, "words" being the prompt of its
images without a caption file (`10_sks dog/`, `3_zwx cat/`; class folders the same, `1_dog/`). `scan_dataset`
reads either kind, decoding every image (`data.images.scan`), and lists every problem; training calls it before
any model loads, `sdlora scan` prints it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdlora import bounds
from sdlora.data.captions import CAPTION_SUFFIXES, PromptRules
from sdlora.data.examples import Example, build_examples, warn_small
from sdlora.data.images import IMAGE_SUFFIXES, display_name, refuse_or_skip_bad, scan
from sdlora.errors import SdloraError

CONCEPT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's `N_words`


@dataclass
class Concept:
    """One folder of images: a kohya `N_words` subfolder, or the plain folder itself."""

    folder: Path
    repeats: int  # kohya's N (1 for a plain folder); the run's --repeats multiplies it
    prompt: str | None  # kohya's words; None for a plain folder (the --prompt / --class-prompt applies)
    images: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    ignored: list[Path] = field(default_factory=list)  # files that are neither images nor captions
    is_class: bool = False
    special: list[Path] = field(default_factory=list)  # FIFOs, devices, sockets: skipped unopened

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass
class Dataset:
    """The instance and class concepts of a run, and what is wrong with them."""

    images: Path
    concepts: list[Concept]
    classes: list[Concept]
    class_folder: Path | None = None
    skipped_folders: list[Path] = field(default_factory=list)  # subfolders of a parent that are not `N_words`
    class_parent: bool = False  # --class-images is a kohya-style parent (its folders name their prompts)

    @property
    def instance_images(self) -> list[Path]:
        return [p for c in self.concepts for p in c.images]

    @property
    def class_images(self) -> list[Path]:
        return [p for c in self.classes for p in c.images]

    @property
    def bad(self) -> list[tuple[Path, str]]:
        return [b for c in self.concepts + self.classes for b in c.bad]

    def problems(self, repeats: int = 1) -> list[str]:
        """What training would refuse or warn about (unreadable files, empty folders, too many repeats), one line
        each."""
        out = [f"{display_name(p, full=True)}: cannot read it ({why})" for p, why in self.bad]
        out += [f"{display_name(c.folder, full=True)}: no images" for c in self.concepts + self.classes
                if not c.images and not c.bad]
        return out + self.bound_problems(repeats)

    def bound_problems(self, repeats: int = 1) -> list[str]:
        """Repeats past the limit (a folder's N, or all of them times --repeats): arithmetic on the listing, so no
        list of that length is ever built."""
        out = [f"{display_name(c.folder, full=True)}: {c.repeats:,} repeats (the folder name's N) is more than the "
               f"limit of {bounds.MAX_REPEATS:,}; rename it, e.g. '10_{c.prompt}'"
               for c in self.concepts + self.classes if c.repeats > bounds.MAX_REPEATS]
        too_long = bounds.epoch_images(self.per_epoch(repeats), repeats)
        return out + ([too_long] if too_long else [])

    def per_epoch(self, repeats: int = 1) -> int:
        """Instance images one epoch shows: files × folder repeats × --repeats."""
        return sum(len(c.images) * c.repeats for c in self.concepts) * repeats

    def ignored(self) -> list[str]:
        """What training does not read: subfolders not named `N_words`, files that are neither images nor captions,
        captions of no image."""
        out = [f"{display_name(p, full=True)}: not a folder named N_words (e.g. '10_sks dog')"
               for p in self.skipped_folders]
        out += [f"{display_name(p, full=True)}: not a regular file (a FIFO, device or socket), skipped unread"
                for c in self.concepts + self.classes for p in c.special]
        what = {True: "a caption of no image", False: "not an image or a caption"}
        return out + [f"{display_name(p, full=True)}: {what[p.suffix.lower() in CAPTION_SUFFIXES]}"
                      for c in self.concepts + self.classes for p in c.ignored]

    def check(self, prompt: str | None, skip_bad: bool = False, log=print, repeats: int = 1) -> None:
        """Refuse (one line) what training cannot use: unreadable images (unless `skip_bad`), no images, images with
        no prompt at all, repeats past the limit. Files that are not regular files are skipped with a note."""
        special = [p for c in self.concepts + self.classes for p in c.special]
        if special:
            log(f"note: skipped {len(special)} file(s) that are not regular files (FIFOs, devices, sockets): "
                + ", ".join(display_name(p) for p in special[:5]) + (" …" if len(special) > 5 else ""))
        too_many = self.bound_problems(repeats)
        if too_many:
            raise SdloraError(too_many[0])
        if self.bad:
            refuse_or_skip_bad(self.bad[0][0].parent if not skip_bad else self.images, self.bad, skip_bad, log)
        if not self.instance_images:
            raise SdloraError(f"{self.images} (--images) has no images; add .jpg/.png/.webp files to it"
                              + (" or to its N_words subfolders" if self.concepts and self.concepts[0].prompt else ""))
        if not prompt and any(c.prompt is None for c in self.concepts):
            raise SdloraError("--prompt is required (the prompt of images without a caption file), unless --images "
                              "is a parent of kohya-style N_words subfolders, e.g. '10_sks dog'")

    def examples(self, rules: PromptRules, resolution: int, buckets, trigger: str | None = None,
                 class_prompt: str | None = None, warn: bool = True) -> tuple[list[Example], list[Example]]:
        """(instance, class) examples. A concept's words are the prompt of its images without a caption and, unless
        --trigger is given, the trigger put first in captions lacking it; class images without a caption take
        their folder's words (a kohya class parent) or --class-prompt."""
        instance, classes = [], []
        for c in self.concepts:
            prompt = c.prompt or rules.prompt
            r = replace(rules, prompt=prompt, trigger=trigger or prompt)
            instance += build_examples(c.images, r, resolution, buckets, repeats=c.repeats, warn=False)
        for c in self.classes:
            if c.prompt is None:
                classes += build_examples(c.images, rules, resolution, buckets, fixed_caption=class_prompt,
                                          is_class=True, repeats=c.repeats, warn=False)
            else:
                r = PromptRules(prompt=c.prompt, trigger="")
                classes += build_examples(c.images, r, resolution, buckets, is_class=True, repeats=c.repeats,
                                          warn=False)
        if warn:
            warn_small(instance + classes)
        return instance, classes


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def is_concept_parent(folder: Path) -> bool:
    """Is `folder` a kohya-style parent: no images of its own, subfolders named `N_words`?"""
    folder = Path(folder)
    if not folder.is_dir() or _has_images(folder):
        return False
    return any(p.is_dir() and CONCEPT_FOLDER.match(p.name) for p in folder.iterdir())


def _concept(folder: Path, repeats: int, prompt: str | None, is_class: bool) -> Concept:
    res = scan(folder)
    stems = {p.stem for p in res.images} | {p.stem for p, _ in res.bad}
    # neither images nor captions, and captions of no image (a renamed or deleted picture)
    ignored = [p for p in res.ignored if p.suffix.lower() not in CAPTION_SUFFIXES or p.stem not in stems]
    return Concept(folder, repeats, prompt, res.images, res.bad, ignored, is_class, res.special)


def scan_folder(folder: Path, is_class: bool = False) -> tuple[list[Concept], list[Path]]:
    """The concepts of `folder` (a plain folder: one; a kohya-style parent: one per `N_words` subfolder, sorted by
    name) and the subfolders skipped."""
    folder = Path(folder)
    what = "--class-images" if is_class else "--images"
    if not folder.is_dir():
        raise SdloraError(f"{display_name(folder, full=True)} ({what}): no such folder; pass a folder of images or of "
                          "N_words subfolders")
    if not is_concept_parent(folder):
        return [_concept(folder, 1, None, is_class)], []
    concepts, skipped = [], []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        m = CONCEPT_FOLDER.match(sub.name)
        words = " ".join(m[2].split()) if m else ""
        if not m or int(m[1]) < 1 or not words:
            skipped.append(sub)
            continue
        concepts.append(_concept(sub, int(m[1]), words, is_class))
    return concepts, skipped


def scan_dataset(images, class_images=None) -> Dataset:
    """Scan the instance folder and the class folder (if any, and if it exists yet): concepts, repeats, every image
    decoded. What `sdlora scan` prints and what training checks first."""
    concepts, skipped = scan_folder(Path(images))
    classes, class_parent = [], False
    if class_images is not None and Path(class_images).is_dir():
        class_parent = is_concept_parent(Path(class_images))
        classes, skipped_cls = scan_folder(Path(class_images), is_class=True)
        skipped += skipped_cls
    return Dataset(Path(images), concepts, classes, Path(class_images) if class_images else None, skipped, class_parent)
