"""bitsandbytes, imported only by the runs that use it (--base-precision/--te-precision int8 or nf4, --optimizer
adamw8bit).

Why: once bitsandbytes is installed, importing diffusers imports it too (diffusers/utils/import_utils.py records
`_bitsandbytes_available` with `importlib.util.find_spec` when diffusers is first imported, and
diffusers/quantizers/bitsandbytes/utils.py, imported by diffusers.models.modeling_utils, runs `import bitsandbytes`
when that flag is set): about a second and 120 MB more at every start, and a warning about missing CPU kernels,
for runs that never quantise. diffusers has no setting to turn that off, so the sdlora command marks bitsandbytes
"not importable" before anything imports diffusers (`hide`), the way Python itself marks a failed import:
`sys.modules["bitsandbytes"] = None` makes `find_spec` answer None and `import bitsandbytes` raise ImportError, and
every library that probes for it (diffusers, peft, transformers, accelerate) takes it as not installed. sdlora's
own uses call `bitsandbytes()`, which lifts the mark and imports it; sdlora quantises with bitsandbytes' layers
directly (sdlora/quant.py), never through diffusers' quantizer, so diffusers' recorded "not available" costs
nothing. Importing sdlora as a library hides nothing (only `sdlora.__main__` calls `hide`).
"""

from __future__ import annotations

import importlib.util
import sys

_NAME = "bitsandbytes"
_hid = False  # whether `hide` set the mark (a mark set by someone else, e.g. a test, is left alone)


def hide() -> None:
    """Mark bitsandbytes not importable until `bitsandbytes()` is called (the sdlora command calls this first)."""
    global _hid
    if _NAME in sys.modules:  # imported already (or hidden): nothing to save
        return
    try:
        installed = importlib.util.find_spec(_NAME) is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        sys.modules[_NAME] = None  # type: ignore[assignment]  # Python's own "not importable" mark
        _hid = True


def bitsandbytes():
    """The bitsandbytes module, imported now (lifting `hide`'s mark, not anyone else's); ImportError when it is not
    installed or cannot load. Its logger is set to errors only: the "no CPU 4-bit kernels from kernels-community" \
notice at import is
    about an optional faster kernel, bitsandbytes falls back to its own."""
    import logging

    global _hid
    if _hid and _NAME in sys.modules and sys.modules[_NAME] is None:
        del sys.modules[_NAME]
    _hid = False
    logging.getLogger(_NAME).setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes
