"""The app's uploads (issue 18, part 5): each visitor sees only its own uploads; the same bytes are read and held
once, whoever uploads them; uploads are bounded in size, per visitor and in all; temp files are deleted once read,
and a visitor's uploads leave memory when its page closes. Real adapter files trained on `toy`, the app's own
Library and listing (app.py's handlers call exactly these with Gradio's session hash as the visitor); the browser
test (tests/test_app.py) drives the upload widget itself.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from sdlora.config import make_config
from sdlora.infer import library as L
from sdlora.infer.session import Session, Settings
from sdlora.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402

torch.set_num_threads(1)
TOY = Path(__file__).resolve().parents[1] / "datasets" / "toy-purple-triangle"


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    out = {}
    for name, seed in (("tri", 0), ("other", 1)):
        out[name] = root / f"{name}.safetensors"
        train(make_config(dict(images=str(TOY), prompt="a sks triangle", model="toy", steps=1, seed=seed,
                               out=str(out[name]), no_eval_loss=True)), log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def session():
    return Session("toy")


def temp_copy(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    """What Gradio hands the app: a temp copy of the upload, under its own folder, with the uploaded name."""
    folder = tmp_path / f"gradio-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    return Path(shutil.copy(src, folder / (name or src.name)))


def test_a_visitor_sees_only_its_own_uploads_and_each_can_generate_with_its_own(tmp_path, adapters, session):
    lib = L.Library(None)
    assert lib.upload(temp_copy(adapters["tri"], tmp_path), "alice") is None
    assert lib.upload(temp_copy(adapters["other"], tmp_path), "bob") is None
    alice = app.listing(session, lib, visitor="alice")
    bob = app.listing(session, lib, visitor="bob")
    assert [r["label"] for r in alice] == ["tri"] and [r["label"] for r in bob] == ["other"]
    assert app.listing(session, lib, visitor="carol") == []
    # the model is shared: after bob's listing, alice's adapter still blends (the session matched every upload)
    settings = Settings(prompt="a sks triangle", steps=2, seed=1)
    [(with_tri, _)] = session.generate(settings, {alice[0]["name"]: 1.0})
    [(plain, _)] = session.generate(settings, {})
    assert with_tri.tobytes() != plain.tobytes()


def test_the_same_bytes_are_read_once_and_freed_when_the_last_holder_leaves(tmp_path, adapters):
    lib = L.Library(None)
    for visitor, name in (("alice", "tri.safetensors"), ("alice", "copy.safetensors"), ("bob", "mine.safetensors")):
        assert lib.upload(temp_copy(adapters["tri"], tmp_path, name), visitor) is None
    assert len(lib.files) == 1 and lib.uploads == {"alice": [*lib.files], "bob": [*lib.files]}
    lib.forget("alice")
    assert len(lib.files) == 1 and lib.visible("bob") == [*lib.files]
    lib.forget("bob")
    assert lib.files == {} and lib.owners == {} and lib.uploads == {}


def test_temp_files_are_deleted_once_read_or_refused(tmp_path, adapters):
    lib = L.Library(None)
    good = temp_copy(adapters["tri"], tmp_path)
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"not an adapter at all")
    assert lib.upload(good, "alice") is None
    why = lib.upload(bad, "alice", name="notes.safetensors")
    assert why and "notes.safetensors" in why and str(tmp_path) not in why  # no server path in the message
    assert not good.exists() and not bad.exists()
    assert lib.refused == {}  # a visitor's refusal is not shown on everyone's page


@pytest.mark.parametrize("limit,value,needle", [
    ("MAX_UPLOAD_BYTES", 1000, "MiB an upload may be; put it in the app's --adapters folder instead"),
    ("MAX_UPLOADS", 1, "this page holds 1 uploads, the most it may; reload the page"),
    ("MAX_HELD", 1, "the app holds 1 uploads, the most it keeps"),
])
def test_uploads_are_bounded(monkeypatch, tmp_path, adapters, limit, value, needle):
    monkeypatch.setattr(L, limit, value)
    lib = L.Library(None)
    first = lib.upload(temp_copy(adapters["tri"], tmp_path), "alice")
    if limit == "MAX_UPLOAD_BYTES":
        assert first and needle in first and lib.files == {}
        return
    assert first is None
    visitor = "alice" if limit == "MAX_UPLOADS" else "bob"
    why = lib.upload(temp_copy(adapters["other"], tmp_path), visitor)
    assert why and needle in why and len(lib.files) == 1
