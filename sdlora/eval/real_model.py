"""`sdlora eval` on real models: the DreamBooth protocol (25 prompts per subject, 4 images each by default) scored
with CLIP-I, CLIP-T and DINO, for the adapter and for the base model at the same seeds."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from sdlora.data.images import checked_images
from sdlora.errors import SdloraError
from sdlora.eval.dreambooth_metrics import DEFAULT_CLIP, DEFAULT_DINO, LIVE_CLASSES, FeatureModels, dreambooth_prompts

PROMPTS_FILE = Path(__file__).with_name("dreambooth_prompts.txt")


def cmd_eval_real(args) -> int:
    from sdlora.formats.read import read_adapter
    from sdlora.infer.session import Session, Settings

    if not args.reference_images or not args.class_noun:
        raise SdloraError("scoring on a real model needs --reference-images DIR (photos of the subject) and "
                          "--class-noun NOUN (e.g. dog)")
    if args.num_images < 1:
        raise SdloraError(f"--num-images must be at least 1, got {args.num_images}")
    refs = [Image.open(p).convert("RGB") for p in checked_images(Path(args.reference_images), "--reference-images")]
    from sdlora.infer.session import refuse_misfits

    refuse_misfits([read_adapter(args.adapter)], args.model)  # a broken or misfit file, before any model loads
    features = FeatureModels(args.clip_model or DEFAULT_CLIP, args.dino_model or DEFAULT_DINO)
    if len(features.skipped) == 3:
        for metric, why in features.skipped.items():
            print(f"{metric:7s} skipped: {why}")
        print("no metric model is available locally: nothing to score")
        return 0
    from tqdm import tqdm

    print(f"loading model {args.model}", flush=True)
    session = Session(args.model)
    name = session.add(args.adapter).file.name
    templates = dreambooth_prompts(PROMPTS_FILE, live=args.class_noun in LIVE_CLASSES)
    print(f"generating {args.num_images} images for each of {len(templates)} DreamBooth prompts, without the adapter, "
          f"then with it at strength {args.strength:g}; then scoring them", flush=True)
    results = {}
    for label, strength in (("base", 0.0), ("adapter", args.strength)):
        generated = {}
        for template in tqdm(templates, desc="base model" if label == "base" else "with the adapter", unit="prompt",
                             file=sys.stderr):
            prompt = template.format(args.token, args.class_noun)
            settings = Settings(prompt=prompt, seed=args.seed, steps=args.steps, num_images=args.num_images)
            clean = " ".join(template.format("", args.class_noun).split())  # CLIP-T: the prompt without the trigger
            generated[clean] = [im for im, _ in session.generate(settings, {name: strength})]
        results[label] = features.score(generated, refs)
    print(f"adapter {args.adapter} at strength {args.strength:g} on {args.model}; {len(templates)} DreamBooth prompts "
          f"x {args.num_images} images, '{args.token} {args.class_noun}' vs {len(refs)} reference images")
    for metric in ("DINO", "CLIP-I", "CLIP-T"):
        if metric in results["adapter"].values:
            print(f"{metric:7s} {results['adapter'].values[metric]:.3f}  (base {results['base'].values[metric]:.3f})")
        else:
            print(f"{metric:7s} skipped: {features.skipped[metric]}")
    print("paper, DreamBooth (Stable Diffusion): DINO 0.668, CLIP-I 0.803, CLIP-T 0.305")
    return 0
