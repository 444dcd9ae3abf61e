"""`python -m sdlora.toy pretrain|report|dataset` — see sdlora/toy/__init__.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdlora.toy", description="The toy world and its pretrained base.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pretrain", help="train VAE, text encoder and UNet from scratch and write the base folder")
    a.add_argument("--out", default=str(Path(__file__).parent / "base"))
    a.add_argument("--vae-steps", type=int, default=1200)
    a.add_argument("--unet-steps", type=int, default=2000)
    a.add_argument("--unet-batch", type=int, default=64)
    a.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: leave the machine usable)")
    a = sub.add_parser("report", help="judge accuracy, VAE round trip and the base's judged accuracy per prompt")
    a.add_argument("--base", default=str(Path(__file__).parent / "base"), help="toy base folder")
    a.add_argument("-n", type=int, default=8, help="images per prompt (default 8)")
    a.add_argument("--no-backgrounds", action="store_true", help="only colour + shape prompts")
    a.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("dataset", help="render a DreamBooth folder of a (held-out) subject")
    a.add_argument("--subject", default="a purple triangle", help="toy-world caption (default: a purple triangle)")
    a.add_argument("--out", required=True, help="folder to write NN.png into")
    a.add_argument("-n", type=int, default=5, help="images (default 5)")
    a.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.cmd == "pretrain":
        from sdlora.toy.pretrain import pretrain

        pretrain(Path(args.out), vae_steps=args.vae_steps, unet_steps=args.unet_steps, unet_batch=args.unet_batch,
                 log=lambda s: print(s, flush=True))
    elif args.cmd == "report":
        from sdlora import archs
        from sdlora.models import from_components
        from sdlora.toy import TOY_ARCH, TOY_RESOLUTION, toy_components
        from sdlora.toy.report import report

        base = from_components("toy", archs.get(TOY_ARCH), toy_components(args.base), TOY_RESOLUTION)
        report(base, n=args.n, backgrounds=not args.no_backgrounds, log=lambda s: print(s, flush=True))
    elif args.cmd == "dataset":
        from sdlora.toy.world import subject_images

        print(subject_images(args.subject, args.out, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
