"""`python -m sdlora` and the `sdlora` command."""

import os
import sys

from sdlora import lazy

lazy.hide()  # before anything imports diffusers: bitsandbytes loads only for runs that use it (sdlora/lazy.py)

from sdlora.cli import main  # noqa: E402  (after lazy.hide() above, on purpose)


def run() -> None:
    """`main`, then the process ends at once: everything is written and closed by then, and the interpreter's own
    teardown (freeing torch's modules and libraries one by one) would add seconds after a finished run."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
