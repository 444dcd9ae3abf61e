"""`sdlora eval`: score an adapter. On the toy model, judged subject and prompt fidelity (`toy_score`); on a real
model, DreamBooth's CLIP-I, CLIP-T and DINO (`real_model`)."""

from __future__ import annotations

import sys

from sdlora.eval.toy_score import score_adapter
from sdlora.toy import world


def add_eval_args(p) -> None:
    p.add_argument("--adapter", required=True, metavar="FILE", help="required: the LoRA .safetensors to score")
    p.add_argument("--subject", default=None,
                   help="toy model: what the trigger prompt should show, as a toy-world caption, "
                   "e.g. 'a purple triangle'")
    p.add_argument("--reference-images", default=None,
                   help="real models: folder of the real subject's photos (CLIP-I/DINO compare against them)")
    p.add_argument("--class-noun", default=None, help="real models: the subject's class, e.g. 'dog'")
    p.add_argument("--token", default="sks", help="real models: the trigger word in the prompts (default: sks)")
    p.add_argument("--clip-model", default=None, help="real models: local CLIP (default: openai/clip-vit-base-patch32 "
                   "from the local Hugging Face cache)")
    p.add_argument("--dino-model", default=None, help="real models: local DINO (default: facebook/dino-vits16 from "
                   "the local cache)")
    p.add_argument("--steps", type=int, default=30, help="real models: denoising steps (default: 30)")
    p.add_argument("--prompt", default=None,
                   help="trigger prompt (default: the adapter's trigger from its metadata, e.g. 'a sks triangle')")
    p.add_argument("--class-prompt", default=None, help="class prompt checked for leaks (default: 'a <shape>')")
    p.add_argument("--model", default="toy", help="base model: 'toy' (judged by the toy world's judge), or a real "
                   "model scored with the DreamBooth metrics CLIP-I, CLIP-T and DINO (default: toy)")
    p.add_argument("--strength", type=float, default=1.0, help="adapter strength (default: 1)")
    p.add_argument("-n", "--num-images", type=int, default=8, help="images per prompt (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")


def cmd_eval(args) -> int:
    from sdlora.errors import SdloraError
    from sdlora.formats.read import read_adapter
    from sdlora.models import load_base

    if args.model != "toy":
        from sdlora.eval.real_model import cmd_eval_real

        return cmd_eval_real(args)
    if not args.subject:
        raise SdloraError("--subject is required with the toy model, e.g. --subject 'a purple triangle'")
    if "shape" not in world.parse_caption(args.subject):
        raise SdloraError(f"--subject {args.subject!r}: name a colour and a shape of the toy world, e.g. "
                          f"'a purple triangle' (shapes: {', '.join(world.SHAPES)}; "
                          f"colours: {', '.join(world.COLOURS)})")
    if args.num_images < 1:
        raise SdloraError(f"--num-images must be at least 1, got {args.num_images}")
    f = read_adapter(args.adapter)  # checked before the model loads
    from sdlora.infer.session import refuse_misfits

    refuse_misfits([f], "toy")  # an adapter of another family or built-in model, named before the toy model loads
    prompt = args.prompt or f.trigger
    if not prompt:
        raise SdloraError(f"{args.adapter}: its metadata names no trigger; pass --prompt 'a sks triangle'")
    print("loading the toy base model", flush=True)
    base = load_base("toy")
    print(f"scoring {args.adapter} at strength {args.strength:g}: {args.num_images} images for each prompt (the "
          "trigger, the class and every seen colour x shape), without the adapter, then with it", flush=True)
    bars = {}

    def progress(label, done, n):
        from tqdm import tqdm

        if label not in bars:
            bars[label] = tqdm(total=n, desc=label, unit="prompt", file=sys.stderr)
        bars[label].update(done - bars[label].n)
        if done == n:
            bars[label].close()

    s = score_adapter(base, args.adapter, prompt, args.subject, args.class_prompt, n=args.num_images,
                      strength=args.strength, seed=args.seed, progress=progress)
    print(f"adapter {args.adapter} at strength {args.strength:g} on the toy base; trigger prompt {prompt!r}, "
          f"subject {args.subject!r}, {args.num_images} images per prompt")
    for line in s.lines():
        print(line)
    worst = sorted(((p, a, b) for p, (a, b) in s.per_prompt.items() if b < a), key=lambda x: x[2] - x[1])[:3]
    print("largest drops: " + (", ".join(f"{p!r} {100 * a:.0f}% -> {100 * b:.0f}%" for p, a, b in worst) or "none"))
    return 0
