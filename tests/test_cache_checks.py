"""Caches and checkpoints are validated on read (issue 18, part 4).

A latent or text-embedding cache entry read from disk is used only when its tensor names, dtype, shapes and values
are what this run computes; anything else (fuzzed with hypothesis: other names, shapes, dtypes, NaN, truncated or
random bytes) is recomputed, said once, and never trained on. A checkpoint manifest with missing fields or fields of
the wrong type (fuzzed) is refused in one line, never a traceback. The cache root carries a marker that
`sdlora cache --clear` relies on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sdlora.archs import get as arch_spec
from sdlora.cache import CACHE_MARKER, EmbeddingCache, LatentCache, _Store, is_cache_dir
from sdlora.config import make_config
from sdlora.data.examples import Example
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from sdlora.tiny import tiny_components
from sdlora.train import ckpt
from sdlora.train.loop import train
from tests.helpers import DOG, make_images

torch.set_num_threads(1)
FUZZ = dict(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]


def tensors_strategy(names: list[str]):
    """Dicts of tensors: names from `names` plus strangers, any small shape, any dtype, maybe NaN/Inf."""
    shape = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
    tensor = st.tuples(shape, st.sampled_from(DTYPES), st.sampled_from([None, "nan", "inf"]))
    return st.dictionaries(st.sampled_from(names + ["x", "h", "p", "mean", "latent"]), tensor, max_size=4)


def make_tensor(shape, dtype, poison) -> torch.Tensor:
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 5, shape, dtype=dtype)
    if poison and dtype.is_floating_point and t.numel():
        t.view(-1)[0] = float(poison)
    return t


def garble(path: Path, case, good: bytes) -> bool:
    """Write a damaged entry to `path`; False when the case happens to be a valid entry (nothing to detect)."""
    kind, arg = case
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncate":
        path.write_bytes(good[: int(len(good) * arg)])
    elif kind == "bytes":
        path.write_bytes(arg)
    else:
        save_file({k: make_tensor(*spec) for k, spec in arg.items()}, path)
    return True


def cases(names: list[str]):
    return st.one_of(st.tuples(st.just("truncate"), st.floats(0, 0.999)),
                     st.tuples(st.just("bytes"), st.binary(max_size=200)),
                     st.tuples(st.just("tensors"), tensors_strategy(names)))


def valid_case(case, expect: dict[str, tuple]) -> bool:
    kind, arg = case
    return kind == "tensors" and set(arg) == set(expect) and all(
        tuple(s) == tuple(expect[k]) and d == torch.float32 and p is None for k, (s, d, p) in arg.items())


@pytest.fixture(scope="session")
def vae():
    return tiny_components()["vae"]


def test_fuzzed_latent_cache_entries_are_recomputed_never_used(tmp_path_factory, vae):
    root = tmp_path_factory.mktemp("latents")
    img = make_images(root / "i", 1, (64, 48), seed=1) / "img_0.png"
    ex = Example(img, "c", (64, 48))
    folder = root / "cache"
    cache = LatentCache(vae, folder)
    mean, std = cache.get(ex, False)
    assert tuple(mean.shape) == cache.shape(ex) == (4, 6, 8)  # the computed shape is what the formula says
    entry = next(folder.rglob(f"{cache.key(ex, False)}.safetensors"))
    good = entry.read_bytes()
    outcomes = {"rebuilt": 0}

    @settings(**FUZZ)
    @given(case=cases(["mean", "std"]))
    def check(case):
        if valid_case(case, {"mean": mean.shape, "std": mean.shape}):
            return
        garble(entry, case, good)
        notes = []
        cache.store = _Store(folder / "latents", folder, notes.append)  # the next run's store
        got_mean, got_std = cache.get(ex, False)
        assert torch.equal(got_mean, mean) and torch.equal(got_std, std)
        assert (cache.store.hits, cache.store.misses, cache.store.rebuilt) == (0, 1, 1)
        assert len(notes) == 1 and notes[0].startswith("note: damaged cache entry"), notes
        assert entry.read_bytes() != b"" and load(entry)[0].keys() == {"mean", "std"}  # rewritten whole
        outcomes["rebuilt"] += 1

    check()
    assert outcomes["rebuilt"] >= 40, outcomes


def test_fuzzed_text_cache_entries_are_recomputed(tmp_path):
    c = tiny_components()
    tok, te = c["tokenizer"], c["text_encoder"]
    folder = tmp_path / "cache"
    first = EmbeddingCache([(tok, te)], arch_spec("sd1"), folder)
    h, _ = first.get(["sks dog"])
    entry = next(folder.rglob(f"{first.key('sks dog')}.safetensors"))
    good = entry.read_bytes()

    @settings(**(FUZZ | {"max_examples": 30}))
    @given(case=cases(["h"]))
    def check(case):
        if valid_case(case, {"h": tuple(h.shape[1:])}):
            return
        garble(entry, case, good)
        notes = []
        again = EmbeddingCache([(tok, te)], arch_spec("sd1"), folder, notes.append)
        assert torch.equal(again.get(["sks dog"])[0], h)
        assert again.store.rebuilt == 1 and len(notes) == 1

    check()


def test_a_damaged_latent_cache_is_said_once_and_never_trained_on(tmp_path):
    """Two runs with the same seed give the same adapter, even when the second finds latents of the wrong shape,
    NaN and unexpected names in its cache: those are recomputed, and the run says so once."""
    cache_dir = tmp_path / "cache"

    def run(out):
        lines = []
        train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=5, out=str(out),
                               cache_dir=str(cache_dir), no_eval_loss=True, no_flip=True)), log=lines.append)
        return lines

    run(tmp_path / "a.safetensors")
    assert is_cache_dir(cache_dir)
    entries = sorted((cache_dir / "latents").rglob("*.safetensors"))
    assert len(entries) == 5
    save_file({"mean": torch.zeros(4, 4, 4), "std": torch.ones(4, 4, 4)}, entries[0])  # wrong shape
    t = load(entries[1])[0]
    save_file(t | {"mean": t["mean"].clone().fill_(float("nan"))}, entries[1])  # NaN
    save_file(t | {"extra": torch.zeros(1)}, entries[2])  # an unexpected name
    lines = run(tmp_path / "b.safetensors")
    notes = [ln for ln in lines if ln.startswith("note: damaged cache entry")]
    assert len(notes) == 1, lines
    assert any("2 from cache, 3 encoded (3 damaged entries recomputed)" in ln for ln in lines), lines
    a, b = load(tmp_path / "a.safetensors")[0], load(tmp_path / "b.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_root_carries_a_marker_only_sdlora_writes(tmp_path):
    folder = tmp_path / "cache"
    LatentCache(tiny_components()["vae"], folder)  # nothing written yet: no marker, no folder
    assert not folder.exists() and not is_cache_dir(folder)
    text = (tmp_path / "notes")
    text.mkdir()
    (text / "a.safetensors").write_bytes(b"x")
    assert not is_cache_dir(text) and not is_cache_dir(tmp_path / "missing")
    other = tmp_path / "other-tool"  # another program's CACHEDIR.TAG is not sdlora's
    other.mkdir()
    (other / CACHE_MARKER).write_text("Signature: 8a477f597d28d172789f06886806bc55\n# made by pip\n")
    assert not is_cache_dir(other)
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(folder / CACHE_MARKER, linked / CACHE_MARKER)
    img = make_images(tmp_path / "i", 1, (64, 64)) / "img_0.png"
    LatentCache(tiny_components()["vae"], folder).get(Example(img, "c", (64, 64)), False)
    assert is_cache_dir(folder) and (folder / CACHE_MARKER).read_text().startswith("Signature: 8a477f597d28d172789f")
    assert not is_cache_dir(linked)  # a link to a marker does not mark a folder


# ---------------------------------------------------------------- checkpoint manifests

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = root / "a.safetensors"
    train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=4, save_every=2, keep_last=0,
                           out=str(out), no_eval_loss=True)), log=lambda *a: None)
    folder = root / "a-checkpoints" / "step-000002"
    return folder, json.loads((folder / "manifest.json").read_text())


SCALAR = st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=False) | st.text(max_size=5)
JSON = st.recursive(SCALAR,
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                    max_leaves=8)


def test_fuzzed_manifests_are_refused_in_one_line(checkpoint):
    folder, good = checkpoint
    edit = st.one_of(st.tuples(st.just("drop"), st.sampled_from(sorted(good))),
                     st.tuples(st.just("set"), st.tuples(st.sampled_from(sorted(good)), JSON)),
                     st.tuples(st.just("nest"), st.tuples(st.sampled_from(["position", "identity", "data"]), JSON)))
    seen = {"refused": 0, "accepted": 0}

    @settings(**(FUZZ | {"max_examples": 150}))
    @given(edits=st.lists(edit, min_size=1, max_size=3), whole=st.sampled_from([None] * 9) | JSON)
    def check(edits, whole):
        manifest = json.loads(json.dumps(good))
        for kind, arg in edits:
            if kind == "drop":
                manifest.pop(arg, None)
            elif kind == "set":
                manifest[arg[0]] = arg[1]
            elif isinstance(manifest.get(arg[0]), dict):
                manifest[arg[0]]["epoch" if arg[0] == "position" else next(iter(manifest[arg[0]]), "k")] = arg[1]
        if whole is not None:
            manifest = whole
        try:
            ckpt.check_manifest(folder, manifest)
            seen["accepted"] += 1
        except SdloraError as e:
            line = str(e)
            assert "\n" not in line and ("corrupt checkpoint manifest.json" in line or "checkpoint format" in line)
            assert "start a new run" in line
            seen["refused"] += 1

    check()
    assert seen["refused"] >= 100, seen


@pytest.mark.parametrize("field,value,needle", [
    ("step", "2", "step must be a whole number >= 0"),
    ("step", -1, "step must be a whole number >= 0"),
    ("position", {"epoch": 0, "batch": "1", "micro": 0}, "position must be an object of whole numbers"),
    ("optimizer_param_groups", [{"params": "all"}], "optimizer_param_groups must be a list of parameter groups"),
    ("python_rng", [3, [1, 2], "x"], "python_rng must be a Python random state"),
    ("optimizer_values", {"x": 1}, "optimizer_values must be an object of 'N/name' values"),
    ("data", {"a.png": 3}, "data must be an object of image digests"),
    ("format", "1", 'checkpoint format "1" is not 1'),
])
def test_manifest_fields_of_the_wrong_type_are_one_line_errors(tmp_path, checkpoint, field, value, needle):
    folder, good = checkpoint
    copy = tmp_path / "step-000002"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").write_text(json.dumps(good | {field: value}))
    out = tmp_path / "a.safetensors"
    with pytest.raises(SdloraError) as e:
        train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=4, save_every=2, keep_last=0,
                               out=str(out), resume=str(copy), no_eval_loss=True)), log=lambda *a: None)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
