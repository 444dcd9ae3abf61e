"""`--captioner toy`: the toy world's judge (sdlora/eval/toy_judge.py) turned into a captioner. It reads each
image's object colour, shape and background by hand-written rules, so it runs offline in milliseconds and names
what the judge that scores toy-world adapters sees: "a purple triangle on a grey background"."""

from __future__ import annotations

from sdlora.caption.options import Options


class ToyCaptioner:
    sep = " "  # a sentence: cut at word boundaries
    what = "the toy world's judge (offline)"

    def caption(self, images) -> list[str]:
        from sdlora.eval.toy_judge import judge
        from sdlora.toy import world

        out = []
        for im in images:
            v = judge(im)
            if v.shape == "none":  # nothing there, or nothing the judge can name: say only what it saw
                out.append(f"a {v.background} background")
            else:
                out.append(world.caption(None if v.colour == "none" else v.colour, v.shape, v.background))
        return out


def load(model: str | None, opts: Options) -> ToyCaptioner:
    return ToyCaptioner()  # no model to choose: command.py refuses --captioner-model for it
