"""PNGs name the base model as A1111 does (`Model:` the checkpoint's file stem, `Model hash:` the first 10 hex of
its sha256, A1111's shorthash), never a local path; folders and hub ids by their last path component, no hash."""

from __future__ import annotations

import hashlib

from safetensors.torch import save_file

from sdlora.formats import checkpoint as C
from sdlora.formats.a1111 import format_parameters, parse_parameters
from sdlora.infer.session import Session, Settings
from sdlora.merge import ldm_state_dict
from sdlora.models import load_base, model_identity


def test_names_and_hashes_without_local_paths(tmp_path):
    assert model_identity("tiny") == ("tiny", None) and model_identity("toy") == ("toy", None)
    assert model_identity("stable-diffusion-v1-5/stable-diffusion-v1-5") == ("stable-diffusion-v1-5", None)
    folder = tmp_path / "models" / "my-diffusers-model"
    folder.mkdir(parents=True)
    assert model_identity(str(folder)) == ("my-diffusers-model", None)
    assert model_identity(str(folder) + "/") == ("my-diffusers-model", None)
    assert model_identity("C:\\models\\dreamy") == ("dreamy", None)

    # a real single-file checkpoint (the tiny SD 1.x model in the LDM layout) in a nested folder
    path = tmp_path / "checkpoints" / "sub dir" / "v1-5-pruned-emaonly.safetensors"
    path.parent.mkdir(parents=True)
    tiny = load_base("tiny")
    save_file(ldm_state_dict(tiny), str(path), C.ldm_metadata(tiny))
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert model_identity(str(path)) == ("v1-5-pruned-emaonly", short)

    # what `sdlora generate` and the app write: the name and hash, not the path
    session = Session(str(path))
    assert session.identity == ("v1-5-pruned-emaonly", short)
    [(_, params)] = session.generate(Settings(prompt="a dog", steps=1, width=16, height=16), {})
    text = format_parameters(params)
    assert f"Model hash: {short}, Model: v1-5-pruned-emaonly" in text
    assert str(tmp_path) not in text and "/" not in text.splitlines()[-1].split("Version:")[0]
    assert parse_parameters(text) == params and params.extra["Model hash"] == short
    # switching models renames (and drops the hash for a built-in one)
    session.use_model("tiny")
    [(_, params)] = session.generate(Settings(prompt="a dog", steps=1, width=16, height=16), {})
    assert params.model == "tiny" and "Model hash" not in params.extra
