"""Pivotal tuning on the toy world: the quick start (its trigger "sks" is a word of the toy vocabulary that never
appears in pretraining captions), the quick start with `--te-lr 2e-4` (the recipe the prior-drift study chose), and
the quick start learning the new word "ohwx" as a token of its own (`--pivotal 1`, started from the class prompt's
last token, "triangle"), with the text-encoder LoRA (at --lr, and at --te-lr 2e-4) and without it; same budget
(600 steps, lr 1e-3), 3 seeds, scored as `sdlora eval --subject "a purple triangle"` scores, each run with its own
trigger prompt.

    python benchmarks/toy_pivotal.py -j 2      # 15 runs; adapters, logs and results.json in /tmp/toyruns/pivotal

Training and scoring are benchmarks/toy_kinds.py's (`sdlora train` in a subprocess, one shared class-image folder,
adapters already in --out scored again, not retrained); the table has its columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_kinds as K  # noqa: E402

PIVOTAL = ["--prompt", "a ohwx triangle", "--trigger", "ohwx", "--pivotal", "1", "--pivotal-lr", "2e-3"]
# name -> (flags on top of the quick start, label, trigger prompt scored)
CONFIGS = {
    "default": ([], "the quick start (lora rank 4)", "a sks triangle"),
    "telr2e-4": (["--te-lr", "2e-4"], "`--te-lr 2e-4`", "a sks triangle"),
    "pivotal": (PIVOTAL, "`--pivotal 1 --pivotal-lr 2e-3` (trigger ohwx)", "a ohwx triangle"),
    "pivotal-telr": (PIVOTAL + ["--te-lr", "2e-4"], "`--pivotal 1 --pivotal-lr 2e-3 --te-lr 2e-4`",
                     "a ohwx triangle"),
    "pivotal-notext": (PIVOTAL + ["--no-text-encoder"], "`--pivotal 1 --pivotal-lr 2e-3 --no-text-encoder`",
                       "a ohwx triangle"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/toyruns/pivotal"))
    p.add_argument("-j", "--jobs", type=int, default=1)
    a = p.parse_args(argv)
    for n, (flags, label, _) in CONFIGS.items():  # toy_kinds trains by its table
        K.CONFIGS[f"piv-{n}"] = (flags, label)
    a.out.mkdir(parents=True, exist_ok=True)
    class_images = a.out / "class"
    jobs = [(f"piv-{n}", s) for s in a.seeds for n in a.configs]
    print(f"{len(jobs)} runs; e.g. {' '.join(K.train_cmd(*jobs[-1], a.out, class_images)[1:])}", flush=True)
    results = K.run_and_score(jobs, a.out, class_images, a.jobs,
                              trigger_of=lambda n: CONFIGS[n.removeprefix("piv-")][2], class_prompt="a triangle")
    print()
    print(K.table(results, [f"piv-{n}" for n in a.configs], a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
