"""Make the README's figures on the offline toy model: a before/after grid and the loss curve of the quickstart run.

    python docs/make_figures.py                               # trains the quick start's adapter itself (~1-2 min)
    python docs/make_figures.py --adapter output/toy.safetensors   # the adapter the README's quick start wrote

Writes docs/toy_before_after.png and docs/toy_loss.png. Without --adapter it runs exactly the README quick start
(DreamBooth on the held-out purple triangle with prior preservation: 40 class images, 600 steps, lr 1e-3, seed 0);
with it, it uses that file and the loss curve saved beside it. It then draws, for each prompt, four fixed seeds
without the adapter (left) and with it (right).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdlora.config import make_config  # noqa: E402
from sdlora.formats.file_io import save_png  # noqa: E402
from sdlora.infer.session import Session, Settings  # noqa: E402
from sdlora.train.loop import train  # noqa: E402

PROMPTS = ["a sks triangle", "a triangle", "a sks triangle on a white background", "a red circle on a black background"]
SEEDS = (0, 1, 2, 3)
CELL = 64


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Draw the README's toy figures.")
    ap.add_argument("--adapter", type=Path, help="the quick start's adapter (default: train it here)")
    args = ap.parse_args(argv)
    out_dir = ROOT / "docs"
    with tempfile.TemporaryDirectory() as d:
        if args.adapter:
            adapter, loss = args.adapter, args.adapter.with_name(args.adapter.stem + "-loss.png")
        else:
            cfg = make_config(dict(model="toy", images=str(ROOT / "datasets" / "toy-purple-triangle"),
                                   prompt="a sks triangle", class_prompt="a triangle", num_class_images=40,
                                   steps=600, lr=1e-3, seed=0, out=str(Path(d) / "toy.safetensors"), output_dir=d))
            result = train(cfg)
            adapter, loss = result.path, result.loss_curve
        shutil.copy(loss, out_dir / "toy_loss.png")
        session = Session("toy")
        name = session.add(adapter).file.name
        rows = []
        for prompt in PROMPTS:
            row = []
            for strength in (0.0, 1.0):
                for seed in SEEDS:
                    settings = Settings(prompt=prompt, seed=seed, steps=20, guidance=5.0)
                    img = session.generate(settings, {name: strength})[0][0]
                    row.append(img.resize((CELL, CELL), Image.Resampling.NEAREST))
            rows.append(row)
    label_w, head = 260, 18
    n = len(SEEDS)
    grid = Image.new("RGB", (label_w + CELL * 2 * n + 8, head + CELL * len(PROMPTS)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w, 3), "toy base (no adapter)", fill="black")
    draw.text((label_w + CELL * n + 8, 3), "with the sks adapter", fill="black")
    for r, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        y = head + r * CELL
        draw.text((4, y + CELL // 2 - 6), prompt, fill="black")
        for c, img in enumerate(row):
            grid.paste(img, (label_w + c * CELL + (8 if c >= n else 0), y))
    save_png(grid, out_dir / "toy_before_after.png")
    print(f"wrote {out_dir / 'toy_before_after.png'} and {out_dir / 'toy_loss.png'}")


if __name__ == "__main__":
    main()
