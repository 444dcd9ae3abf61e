"""The one exception type that reaches the user as a single line."""


class SdloraError(Exception):
    """A problem with the user's input or environment.

    The message is one line that names the problem and the fix; the CLI prints it without a traceback.
    """


def cause(e: BaseException, limit: int = 200) -> str:
    """A library exception's message shortened for a one-line error: its first line, and of that the leading
    sentences that fit in `limit` characters; parenthesised asides go first. Never cut inside a word."""
    import re

    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    while len(text) > limit:
        shorter = re.sub(r"\s*\([^()]*\)", "", text, count=1)  # drop one innermost (aside)
        if shorter == text:
            break
        text = shorter
    if len(text) > limit:
        sentences = re.split(r"(?<=[.!?;:])\s+", text)
        text = sentences[0]
        for s in sentences[1:]:
            if len(text) + 1 + len(s) > limit:
                break
            text += " " + s
    if len(text) > limit:  # one sentence longer than the limit: whole words, marked as shortened
        words, text = text.split(), ""
        for w in words:
            if len(text) + len(w) + 2 > limit:
                break
            text = f"{text} {w}" if text else w
        text = (text or words[0]) + " …"
    return text.rstrip(" .;:,")
