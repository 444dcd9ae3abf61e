"""`sdlora scan DIR`: what training would see in an image folder (concepts, repeats, every image with its size,
bucket, caption and the caption's CLIP token count, what a 77-token window cuts off, the problems), without loading
a model."""

from __future__ import annotations

from sdlora import bounds
from sdlora.data.buckets import make_buckets
from sdlora.data.captions import PromptRules
from sdlora.data.examples import small_images
from sdlora.data.images import display_name
from sdlora.data.kohya_folders import Dataset, scan_dataset
from sdlora.data.tokens import CLIP_WINDOW, counted
from sdlora.errors import SdloraError


def report(ds: Dataset, resolution: int, buckets: bool, prompt: str | None, repeats: int = 1,
           class_prompt: str | None = None, trigger: str | None = None, masks: str | None = None,
           alpha_mask: bool = False) -> list[str]:
    """The lines `sdlora scan` prints: concepts and repeats, every image with its size, bucket and caption (and,
    with --masks/--alpha-mask, its mask's coverage of the training crop), the epoch arithmetic, and the problems."""
    from collections import Counter

    bucket_list = make_buckets(resolution, max(8, resolution // 8)) if buckets else None
    rules = PromptRules(prompt or "", trigger or prompt or "")
    instance, classes = ds.examples(rules, resolution, bucket_list, trigger, class_prompt, warn=False)
    lines = [f"{display_name(ds.images, full=True)}: "
             + (f"{len(ds.concepts)} concept folder(s) (kohya N_words)" if ds.concepts and ds.concepts[0].prompt
                else "a folder of images")]
    by_path = {e.path: e for e in instance + classes}
    tokens = dict(zip(by_path, counted([e.caption for e in by_path.values()])))  # the prompt each image trains on
    for c in ds.concepts + ds.classes:
        exs = [by_path[p] for p in c.images]
        kind = "class" if c.is_class else "instance"
        prompt_of = c.prompt or (class_prompt if c.is_class else prompt) or "(none: pass --prompt)"
        lines.append(f"{kind} {display_name(c.folder)}: {len(c.images)} image(s) × {c.repeats * repeats} repeats, "
                     f"{sum(e.has_caption for e in exs)} with caption files, prompt '{prompt_of}'")
        for e in exs:
            lines.append(f"  {display_name(e.path)}  {e.orig_size[0]}x{e.orig_size[1]} -> {e.size[0]}x{e.size[1]}"
                         f"{'' if e.has_caption else ' (no caption)'}  '{bounds.shown(e.caption)}'"
                         f"  {tokens[e.path][0] + 2}/{CLIP_WINDOW} tokens"
                         + ("" if c.is_class else mask_coverage(e, masks, alpha_mask)))
            if tokens[e.path][1]:
                lines.append(f"    past CLIP's {CLIP_WINDOW} tokens, not read by CLIP (SD 3.5's and FLUX's T5 reads "
                             f"on): '{bounds.shown(tokens[e.path][1])}'")
    per_epoch = sum(e.repeats for e in instance) * repeats
    sizes = Counter(e.size for e in instance)
    lines.append(f"training sees {per_epoch} instance images per epoch ({len(instance)} files), "
                 f"{len(classes)} class images; "
                 + (f"{len(sizes)} bucket(s): " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items()))
                    if bucket_list else f"{resolution}x{resolution}"))
    problems = ds.problems(repeats) + [
        f"{display_name(e.path, full=True)}: {e.orig_size[0]}x{e.orig_size[1]} is smaller than "
        f"{e.size[0]}x{e.size[1]} (upscaled, softer)" for e in small_images(instance + classes)]
    long = [p for p, (_, rest) in tokens.items() if rest]
    if long:  # training warns about them too (sdlora.train.step.long_captions)
        problems.append(f"{len(long)} caption(s) longer than CLIP's {CLIP_WINDOW} tokens (start and end included): "
                        f"CLIP does not read the rest ({display_name(long[0])}: {tokens[long[0]][0] + 2} tokens); "
                        "shorten them")
    if any(c.prompt is None for c in ds.concepts) and not prompt:
        problems.append("images without caption files need --prompt (or kohya-style N_words folders)")
    ignored = ds.ignored()
    if ignored:
        lines.append(f"ignored ({len(ignored)}):")
        lines += [f"  {p}" for p in ignored]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {p}" for p in problems]
    return lines


def mask_coverage(e, masks: str | None, alpha: bool) -> str:
    """`  mask 42.0%`: the share of the training crop the image's mask learns from; "" without masks."""
    from pathlib import Path

    from sdlora.data import masks as M

    if not masks and not alpha:
        return ""
    source = M.ALPHA if alpha else M.mask_file(e.path, Path(masks))
    if source is None:
        return "  mask MISSING"
    return f"  mask {100 * M.coverage(source, e.path, e.size):.1f}%"


def add_scan_args(p) -> None:
    p.add_argument("dir", help="the --images folder: images (with .txt/.caption captions) or N_words subfolders")
    p.add_argument("--class-images", help="the class (regularisation) folder, same conventions")
    p.add_argument("--prompt", help="prompt of images without a caption (as `sdlora train --prompt`)")
    p.add_argument("--class-prompt", help="prompt of class images without a caption in a plain class folder")
    p.add_argument("--trigger", help="as `sdlora train --trigger` (default: the prompt, or each folder's words)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default: 512; the model's "
                   "native size in training)")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets, as `sdlora train --buckets`")
    p.add_argument("--repeats", type=int, default=1, help="as `sdlora train --repeats` (multiplies each folder's N)")
    p.add_argument("--masks", metavar="DIR", help="as `sdlora train --masks`: print each image's mask coverage")
    p.add_argument("--alpha-mask", action="store_true", help="as `sdlora train --alpha-mask`: print each image's "
                   "alpha coverage")


def cmd_scan(args) -> int:
    """Exit 0 when training would start on the folder as it is (warnings allowed), 1 when it would stop."""
    if args.resolution < 8 or args.resolution % 8:
        raise SdloraError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.repeats < 1:
        raise SdloraError(f"--repeats must be at least 1, got {args.repeats}")
    bounds.at_most("--repeats", args.repeats, bounds.MAX_REPEATS, "use --steps or --epochs for a longer run")
    ds = scan_dataset(args.dir, args.class_images)
    lines = report(ds, args.resolution, args.buckets, args.prompt, args.repeats, args.class_prompt, args.trigger,
                   args.masks, args.alpha_mask)
    print("\n".join(lines))
    try:
        ds.check(args.prompt, log=lambda *_: None, repeats=args.repeats)
    except SdloraError as e:
        print(f"training would stop: {e}")
        return 1
    return 0
