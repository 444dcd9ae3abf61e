"""Every module of the package imports on its own (the command-line entry points, `python -m sdlora` and
`python -m sdlora.toy`, without running): a module that only a subprocess or a slow test reaches still fails the
quick tier when it cannot be imported."""

from __future__ import annotations

import importlib
import pkgutil

import sdlora


def test_every_module_of_the_package_imports():
    names = sorted(m.name for m in pkgutil.walk_packages(sdlora.__path__, "sdlora."))
    entry_points = {"sdlora.__main__", "sdlora.cli", "sdlora.toy.__main__", "sdlora.toy.report", "sdlora.train.loop"}
    assert entry_points <= set(names)
    failed = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported at once
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        assert module.__name__ == name
    assert not failed, failed
