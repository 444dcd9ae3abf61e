"""Fixtures shared by the test modules: an isolated latent/text cache, trained tiny adapters shared per settings,
and folders with odd names. Helper functions live in tests/helpers.py. Nothing here imports the training loop at
import time: collecting the suite stays cheap."""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import DOG, train_tiny

# One torch thread everywhere: the test machines have 2 shared cores, the tiny models' ops are too small to split, and
# two contended OpenMP threads spin-wait for each other (a 6 s run took 59 s with 2 threads). Parallelism comes from
# pytest-xdist's worker processes instead (`-n auto`): each imports this file and gets one thread. Set here, at import,
# for this process, and through OMP_NUM_THREADS for every `sdlora` subprocess the tests start (they inherit it).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


# Python's cyclic garbage collector, tuned for a long-lived test worker. A worker holds every imported library
# (torch, transformers, diffusers: millions of objects) and what session fixtures keep, and building a model allocates
# thousands of modules, so the default thresholds (700, 10, 10) ran a full collection over that whole heap every few
# seconds: 16% of a worker's time on 105 tests of test_lycoris/kinds/lora/formats (gc callbacks: 10.7 s of 66.7 s).
# Rarer collections (cycles are still freed: every 20,000 net allocations, in full every 400 of those) and the
# objects alive after collection moved to the permanent generation (`gc.freeze`, never scanned again) cut it to 1.8 s.
gc.set_threshold(20_000, 20, 20)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(items):
    """Slow tests first (in their collected order): under xdist the long ones start early, instead of one of them
    ending the run alone on one worker while the others wait. That order (and xdist's) splits a module's tests, so a
    fixture a module's tests share is session-scoped, not module-scoped: a module-scoped one was torn down between
    them and built again (the toy base's judged images twice, 10 s each; the LyCORIS trainings twice, 6 s each).
    Visible only to its own module either way; session scope just keeps it until the worker ends."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Latent/text caches of this test session live in a temp folder (inherited by subprocesses): tests never
    reuse a cache from an earlier run or touch the user's ~/.cache/sdlora. Under xdist each worker has its own
    session, so its own folder."""
    old = os.environ.get("SDLORA_CACHE")
    os.environ["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("sdlora-cache"))
    yield
    if old is None:
        os.environ.pop("SDLORA_CACHE", None)
    else:
        os.environ["SDLORA_CACHE"] = old


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """This test's own latent/text cache (SDLORA_CACHE, inherited by its subprocesses): no test may pass thanks to
    another's cache entries. Modules that need it for every test say `pytestmark = usefixtures("cache_dir")`."""
    d = tmp_path / "sdlora-cache"
    monkeypatch.setenv("SDLORA_CACHE", str(d))
    return d


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory):
    """trained_adapter(name="dog", **settings) -> the TrainResult of `train_tiny` with those settings, trained once
    per distinct (name, settings) in this session (per xdist worker) and shared. Read-only: a test that changes
    the file or the result's models trains its own. `name` is the file's stem, which the file's metadata records."""
    results: dict[tuple, object] = {}

    def get(name: str = "dog", **settings):
        key = (name, *sorted((k, repr(v)) for k, v in settings.items()))
        if key not in results:
            out = tmp_path_factory.mktemp(f"adapter-{name}") / f"{name}.safetensors"
            results[key] = train_tiny(out, **settings)
        return results[key]

    return get


@pytest.fixture(scope="session")
def trained(trained_adapter):
    """One adapter trained for a few steps with alpha != rank, shared by read-only tests."""
    return trained_adapter("dog", steps=6, rank=4, alpha=2)


@pytest.fixture
def odd_dir(tmp_path) -> Path:
    """A folder whose name has spaces and non-ASCII characters, as users' folders do."""
    d = tmp_path / "my photos ü é 写真"
    d.mkdir()
    return d


@pytest.fixture
def dog_copy(odd_dir) -> Path:
    d = odd_dir / "dog pics"
    shutil.copytree(DOG, d)
    return d


@pytest.fixture(autouse=True)
def default_sigint():
    """Every test starts with Python's own SIGINT handler. A test earlier in the same xdist worker can leave SIGINT
    ignored (a clean-clone CI run saw it: the Ctrl-C tests then found SIG_IGN, and a `sdlora` child inherited the
    ignore and never stopped); the Ctrl-C tests check what sdlora does, not what an earlier test left."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
