"""Honest reports and metadata (issue 18, part 6): kohya's `ss_network_module` per family, a run table that counts
the modules the file holds, no local absolute path anywhere in a file's header, `sdlora verify` saying what it
checked for diffusers (the file or its converted form), and generate/eval refusing an adapter for another model
before the base model loads, naming the model it was made for.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from sdlora.cli import main
from sdlora.config import make_config
from sdlora.formats.file_io import load
from sdlora.formats.meta import portable
from sdlora.formats.verify import verify_file
from sdlora.train.loop import train
from tests.helpers import DOG

torch.set_num_threads(1)


def header(path: Path) -> str:
    """The whole safetensors header (tensor names, offsets, metadata) as text."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:8 + n].decode("utf-8")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """model -> (adapter path, log lines, the absolute folder everything was given in)."""
    root = tmp_path_factory.mktemp("honest").resolve()
    out = {}
    for model in ("tiny", "tiny-sd3", "tiny-flux"):
        images = root / model / "my photos" / "dog"
        shutil.copytree(DOG, images)
        path = root / model / "out" / "a.safetensors"
        lines = []
        train(make_config(dict(images=str(images), prompt="sks dog", model=model, steps=1, out=str(path),
                               cache_dir=str(root / "cache"), no_eval_loss=True)), log=lines.append)
        out[model] = (path, lines, root)
    return out


@pytest.mark.parametrize("model,module", [("tiny", "networks.lora"), ("tiny-sd3", "networks.lora_sd3"),
                                          ("tiny-flux", "networks.lora_flux")])
def test_network_module_is_kohyas_per_family(trained, model, module):
    path, _, _ = trained[model]
    assert load(path)[1]["ss_network_module"] == module


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3", "tiny-flux"])
def test_no_absolute_local_path_in_the_file_header(trained, model):
    path, _, root = trained[model]
    text = header(path)
    for leak in (str(root), str(DOG.parent), "/tmp/", "my photos/dog"):
        assert leak not in text, (leak, re.findall(r".{40}" + re.escape(leak[:8]) + r".{40}", text)[:2])
    cfg = json.loads(load(path)[1]["sdlora_config"])
    assert cfg["images"] == "dog" and cfg["out"] == "a.safetensors" and cfg["cache_dir"] == "cache"
    assert json.loads(load(path)[1]["ss_dataset_dirs"]) == {"dog": {"n_repeats": 1, "img_count": 5}}


@pytest.mark.parametrize("value,kept", [
    ("/home/me/photos/dog", "dog"), ("/home/me/photos/dog/", "dog"), ("C:\\Users\\me\\dog", "dog"),
    ("~/photos/dog", "dog"), ("../../me/dog", "dog"), ("data/dog", "data/dog"), ("tiny", "tiny"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_paths_in_metadata_are_relative_or_a_base_name(value, kept):
    assert portable(value) == kept


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_the_run_table_counts_the_modules_the_file_holds(trained, model):
    path, lines, _ = trained[model]
    table = next(ln for ln in lines if ln.startswith("component"))
    assert "modules in the file" in table
    rows = {ln.split()[0]: ln for ln in "\n".join(lines).splitlines() if re.match(r"^(unet|te\d?)\s", ln)}
    tensors, _ = load(path)
    in_file = len({k.split(".")[0] for k in tensors if k.startswith("lora_unet_")})
    assert rows["unet"].split()[1] == str(in_file), rows["unet"]
    if model == "tiny-flux":  # q/k/v LoRAs fused into one module per attention: the trained layers are more
        trained_layers = int(re.search(r"\((\d+) layers trained\)", rows["unet"])[1])
        assert trained_layers > in_file


def test_verify_says_diffusers_was_checked_on_the_converted_form(trained):
    sd3 = verify_file(trained["tiny-sd3"][0]).tools["diffusers"]
    assert sd3.startswith("applies none of the file as written (no kohya reader for SD 3.x); its converted form")
    assert "load_lora_weights loads" in sd3
    flux = verify_file(trained["tiny-flux"][0]).tools["diffusers"]
    assert flux.startswith("checked on its converted form (`sdlora convert --to diffusers`")
    assert "converted" not in verify_file(trained["tiny"][0]).tools["diffusers"]


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a base model was loaded before the refusal")

    for where in ("sdlora.infer.session", "sdlora.models"):
        monkeypatch.setattr(f"{where}.load_base", boom)


@pytest.mark.parametrize("adapter,args,needle", [
    ("tiny-flux", ["generate", "--model", "tiny", "--prompt", "p"],
     "this adapter is for FLUX.1 (trained on 'tiny-flux'), the model 'tiny' is SD 1.x; pass --model tiny-flux"),
    ("tiny", ["generate", "--model", "tiny-sdxl", "--prompt", "p"],
     "this adapter is for SD 1.x (trained on 'tiny'), the model 'tiny-sdxl' is SDXL; pass --model tiny"),
    ("tiny", ["generate", "--model", "toy", "--prompt", "p"],
     "this adapter was trained on the built-in model 'tiny', not 'toy' (their widths differ); pass --model tiny"),
    ("tiny", ["eval", "--subject", "a purple triangle"],
     "this adapter was trained on the built-in model 'tiny', not 'toy'"),
])
def test_an_adapter_for_another_model_is_refused_before_loading(capsys, tmp_path, trained, no_model_loads,
                                                                adapter, args, needle):
    flag = ["--lora", trained[adapter][0]] if args[0] == "generate" else ["--adapter", trained[adapter][0]]
    code = main([*args, *map(str, flag), "--out", str(tmp_path / "o")] if args[0] == "generate"
                else [*args, *map(str, flag)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("sdlora: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_a_merged_builtin_model_generates_at_its_size_and_as_the_adapter_does(tmp_path):
    """`sdlora merge --model toy` (single file and diffusers folder) is a model `generate` loads: native size from
    the file or folder (toy: 32 px, not SD 1.x's 512), the toy tokenizer for the single file; and its images are
    those of the toy model with the adapter applied."""
    import numpy as np

    from sdlora.infer.session import Session, Settings
    from sdlora.merge import merge

    adapter = tmp_path / "a.safetensors"
    train(make_config(dict(images=str(Path(__file__).parent.parent / "datasets" / "toy-purple-triangle"),
                           prompt="a sks triangle", model="toy", steps=2, lr=1e-2, out=str(adapter),
                           no_eval_loss=True)), log=lambda *a: None)
    settings = Settings(prompt="a sks triangle", steps=4, seed=3)
    with_adapter = Session("toy")
    name = with_adapter.add(adapter).file.name
    [(want, _)] = with_adapter.generate(settings, {name: 1.0})
    fused = {k: m.state_dict() for k, m in with_adapter.base.modules.items()}
    for out in (tmp_path / "m.safetensors", tmp_path / "mdir"):
        merge("toy", [(str(adapter), 1.0, 1.0)], out, dtype="fp32")
        session = Session(str(out))
        assert session.base.native_resolution == 32
        for k, m in session.base.modules.items():  # the weights of toy with the adapter fused at strength 1
            got = m.state_dict()
            assert got.keys() == fused[k].keys()
            assert max((got[n] - fused[k][n]).abs().max().item() for n in got) <= 1e-6, k
        [(image, _)] = session.generate(settings, {})
        assert image.size == (32, 32)
        if out.suffix != ".safetensors":  # a single file takes the family's public scheduler config (not toy's)
            assert np.array_equal(np.asarray(image), np.asarray(want))
