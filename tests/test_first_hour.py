"""What a new user meets in the first hour (issue 14): --help texts, error messages, file permissions, what
`generate` says while it works (what `eval` says is checked on the toy DreamBooth run's own `sdlora eval`, in
tests/test_toy.py), and the app's model picker. Real commands (in-process through
`sdlora.cli.main`; in a subprocess where the environment a process starts with is the point), real tiny models and
real files."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sdlora.errors import SdloraError, cause
from sdlora.models import BUILTIN_MODELS
from tests.helpers import ROOT, error_line, make_images, run_main, run_sdlora, sub_env


def flat(text: str) -> str:
    """Whitespace-normalised, with argparse's line breaks after hyphens undone."""
    return " ".join(text.split()).replace("- ", "-")


def help_of(name: str | None) -> str:
    """--help of `sdlora NAME` (or of app.py), as argparse prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"
    if name is None:
        sys.path.insert(0, str(ROOT))
        import app

        return app.parser().format_help()
    from sdlora.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name].format_help()


def sections(help_text: str) -> dict[str, list[str]]:
    """Group title -> the flags listed under it."""
    out, title = {}, None
    for line in help_text.splitlines():
        if re.match(r"^\S.*:$", line):
            title = line[:-1]
            out[title] = []
        elif title and (m := re.match(r"\s{2}(?:-\w, )?(--[\w-]+)", line)):
            out[title].append(m.group(1))
    return out


# --------------------------------------------------------------------------------------------------- --help

def test_train_help_is_grouped_marks_required_options_lists_every_builtin_model_and_shows_defaults_once():
    from sdlora.config import TrainConfig

    text = help_of("train")
    groups = sections(text)
    titles = ["data", "model", "LoRA", "training", "prior preservation", "output", "checkpoints", "monitoring"]
    assert [t for t in groups if t in titles] == titles, list(groups)
    assert "other options" not in groups  # every setting has its group
    listed = {f for t in titles for f in groups[t]}
    assert listed == {"--" + f.name.replace("_", "-") for f in fields(TrainConfig)}
    assert "--images" in groups["data"] and "--class-prompt" in groups["prior preservation"]
    assert "--save-every" in groups["checkpoints"] and "--sample-every" in groups["monitoring"]
    # required options: in the usage line and marked in their help
    assert text.startswith("usage: sdlora train --images DIR --prompt TEXT")
    body = flat(text)
    assert "--images DIR required (here or in --config):" in body
    # --prompt is required unless the folder names its concepts (kohya's N_words subfolders): said where it is listed
    assert "--prompt TEXT instance prompt" in body and "optional when --images holds N_words subfolders" in body
    assert "--images is required (on the command line or in --config), and --prompt unless" in body
    # every built-in model, with what it is
    model_help = body[body.index("--model MODEL"):body.index("--mixed-precision")]
    for name, what in BUILTIN_MODELS.items():
        assert f"'{name}', {flat(what)}" in model_help
    assert "(default: stable-diffusion-v1-5/stable-diffusion-v1-5)" in model_help
    assert "--preset {default,attn,full} target modules: default, attn, full (default: default)" in body
    # defaults shown once, and never as a second bracket after another
    assert body.count("(default: 500)") == 0 and "ignored when --epochs is set; default: 500)" in body
    for m in re.finditer(r"--[\w-]+ .*?(?= --[\w-]+ |$)", body):
        assert len(re.findall(r"default:|by default", m.group(0))) <= 1, m.group(0)
        assert ") (" not in m.group(0), m.group(0)


def test_every_subcommand_and_the_app_document_their_options_and_defaults():
    for cmd in ("generate", "verify", "inspect", "convert", "merge", "resize", "eval", "cache"):
        body = flat(help_of(cmd))
        for m in re.finditer(r" (--[\w-]+)( [^-\s][^ ]*)? (.*?)(?= --[\w-]+ |$)", body.split("options:", 1)[1]):
            flag, rest = m.group(1), m.group(3)
            assert rest.strip(), f"{cmd} {flag} has no help"
            assert len(re.findall(r"default:|by default", rest)) <= 1, f"{cmd} {flag}: {rest}"
    for cmd in ("generate", "merge"):
        body = flat(help_of(cmd))
        assert all(f"'{name}'," in body for name in BUILTIN_MODELS), cmd
    assert "--prompt TEXT required:" in flat(help_of("generate"))

    opts = flat(help_of(None))
    assert "--port N port to listen on (default: 7860)" in opts
    assert "--outdir DIR where generated PNGs are saved (default: output/app)" in opts
    assert "--allow-any-model" in opts and "--share" in opts
    assert "After the README's quick start: python app.py --model toy --adapters output/" in opts


# ------------------------------------------------------------------------------------------------ messages

LONG = ("Cannot load model some/model: the model is not fully cached locally (Cannot find an appropriate cached "
        "snapshot folder for the specified revision on the local disk and outgoing traffic has been disabled. To "
        "enable repo look-ups and downloads online, pass 'local_files_only=False' as input.) and an error occurred "
        "while trying to fetch metadata from the Hub. Please check out the root cause in the stacktrace above.")


@pytest.mark.parametrize("limit", [40, 80, 120, 200, 300])
def test_cause_shortens_library_messages_by_whole_words_never_mid_word(limit):
    text = cause(OSError(LONG + "\nsecond line"), limit)
    assert len(text) <= limit + 2
    words = {w.rstrip(".") for w in re.findall(r"[\w'=./-]+", LONG)}
    for w in (w.rstrip(".") for w in re.findall(r"[\w'=./-]+", text)):
        assert w in words, (w, text)  # every word is one of the original's, whole
    assert "second line" not in text
    assert cause(ValueError("short one.")) == "short one"
    assert cause(KeyError()) == "KeyError"


def _one_line(p: subprocess.CompletedProcess) -> str:
    return error_line(p.returncode, p.stderr).removeprefix("sdlora: error: ")


def _names_every_builtin(msg: str) -> None:
    for name in BUILTIN_MODELS:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", msg), (name, msg)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["offline mode", "unreachable hub"])
def test_a_hub_model_without_network_says_the_hub_cannot_be_reached_and_how_to_go_on(tmp_path, how):
    env = sub_env(COLUMNS="100", HF_HOME=str(tmp_path / "hf"))  # an empty cache: the model is not there
    env.pop("HF_HUB_OFFLINE", None)
    if how == "offline mode":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: connection refused
    msg = _one_line(run_sdlora("generate", "--model", "someone/some-model", "--prompt", "x", env=env))
    assert msg.startswith("someone/some-model: the Hugging Face hub cannot be reached and the model is not in the "
                          "local cache; "), msg
    assert "connect once to download it" in msg and "local diffusers folder" in msg
    _names_every_builtin(msg)
    assert "local_files" not in msg and "(" in msg and msg.count("(") == msg.count(")")


def test_a_mistyped_builtin_model_is_named_with_a_suggestion_before_any_loading(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    msg = _one_line(run_main(capsys, "train", "--images", "datasets/dog", "--prompt", "sks dog", "--model", "toyy"))
    assert msg.startswith("'toyy' is not a built-in model, an existing folder or file, or a hub id"), msg
    assert "did you mean 'toy'?" in msg
    _names_every_builtin(msg)
    msg = _one_line(run_main(capsys, "generate", "--model", "./no/such/folder", "--prompt", "x"))
    assert msg.startswith("./no/such/folder: no such folder or file; "), msg
    _names_every_builtin(msg)
    msg = _one_line(run_main(capsys, "generate", "--model", "datasets", "--prompt", "x"))
    assert msg.startswith("datasets: the folder has no model_index.json, so it is not a diffusers model; "), msg
    _names_every_builtin(msg)


# --------------------------------------------------------------------------------------------- permissions

def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _write_every_kind_of_output(capsys, images: Path, out: Path, cache: Path) -> None:
    p = run_main(capsys, "train", "--model", "tiny", "--images", images, "--prompt", "sks dog", "--steps", "2",
                 "--class-prompt", "a dog", "--num-class-images", "2", "--save-every", "1", "--sample-every", "1",
                 "--sample-steps", "1", "--output-dir", out, "--name", "dog", "--cache-dir", cache)
    assert p.returncode == 0, p.stderr
    adapter = out / "dog.safetensors"
    steps = [("generate", "--model", "tiny", "--lora", adapter, "--prompt", "x", "--steps", "1", "--num-images", "2",
              "--out", out / "gen"),
             ("generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--out", out / "one.png"),
             ("convert", adapter, out / "dog-diffusers.safetensors", "--to", "diffusers"),
             ("convert", adapter, out / "dog-peft", "--to", "peft"),
             ("resize", adapter, "--rank", "2", "--out", out / "dog-r2.safetensors"),
             ("merge", "--model", "tiny", "--lora", adapter, "--out", out / "merged.safetensors"),
             ("merge", "--model", "tiny", "--lora", adapter, "--out", out / "merged")]
    for args in steps:
        p = run_main(capsys, *args)
        assert p.returncode == 0, (args, p.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_gets_the_usual_permissions_and_no_temp_file_is_left(tmp_path, umask, capsys):
    """Adapters, checkpoints, sample grids, loss curves, class images, generated PNGs, converted, resized and
    merged files: 0666 & ~umask (0644 under the usual umask), folders 0777 & ~umask, written atomically. The
    commands run in-process under that umask (it is the process's; restored after)."""
    out = tmp_path / "out"
    images = make_images(tmp_path / "imgs", n=2, size=(64, 64))
    old_umask = os.umask(umask)
    try:
        _write_every_kind_of_output(capsys, images, out, tmp_path / "cache")
    finally:
        os.umask(old_umask)
    modes = _modes(out) | {f"cache/{k}": v for k, v in _modes(tmp_path / "cache").items()}
    kinds = {"dog.safetensors", "dog-loss.png", "one.png", "dog-diffusers.safetensors", "dog-r2.safetensors",
             "merged.safetensors"}
    assert kinds <= set(modes), sorted(modes)
    for what in ("dog-checkpoints/step-000001/state.safetensors", "dog-samples/step-000001.png", "gen/00000-0.png",
                 "class_images/a-dog/00000-a-dog.png", "dog-peft", "merged/model_index.json"):
        assert any(k.startswith(what) for k in modes), (what, sorted(modes))
    assert any(k.startswith("cache/") and k.endswith(".safetensors") for k in modes)
    for name, mode in modes.items():
        full = (tmp_path / name) if name.startswith("cache") else (out / name)
        want = (0o777 if full.is_dir() else 0o666) & ~umask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)}"
        assert not Path(name).name.endswith(".tmp") and not Path(name).name.startswith(".")


# ------------------------------------------------------------------------------------ what commands say

@pytest.mark.slow
def test_generate_says_what_it_loads_the_adapters_and_strengths_and_labels_each_image(tmp_path, capsys,
                                                                                      trained_adapter):
    adapter = trained_adapter("dog", steps=2).path
    p = run_main(capsys, "generate", "--model", "tiny", "--lora", f"{adapter}:0.8", "--lora", f"{adapter}:1:0.5",
                 "--prompt", "sks dog", "--steps", "2", "--num-images", "2", "--seed", "5", "--out", tmp_path / "gen")
    assert p.returncode == 0, p.stderr
    err = p.stderr.replace("\r", "\n")
    assert "loading model tiny" in err
    assert "model tiny: SD 1.x, epsilon, native size 64 px" in err
    assert "adapter dog.safetensors as <lora:dog>: strength 0.8, 80 modules, trigger 'sks dog'" in err
    assert "adapter dog.safetensors as <lora:dog-2>: strength 1 on the text encoder, 0.5 on the UNet" in err
    assert "generating 2 images of 64x64 px: 2 steps, DPM++ 2M, CFG 7, seeds 5-6" in err
    assert re.search(r"image 1/2: 100%.*2/2", err) and re.search(r"image 2/2: 100%.*2/2", err)
    assert [Path(x).name for x in p.stdout.split()] == ["00000-5.png", "00001-6.png"]  # stdout: the files only


# ---------------------------------------------------------------------------------------- the app's picker

def test_the_app_picker_loads_configured_models_only_and_never_tells_whether_a_server_path_exists(tmp_path):
    sys.path.insert(0, str(ROOT))
    import app
    from sdlora.infer.session import Session

    session, library = Session("tiny"), app.Library(None)
    offered = ["tiny", "toy"]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    messages = {}
    for allow_any in (False, True):
        for path in (folder, tmp_path / "no-such-model", ROOT / "README.md", "someone/some-model"):
            with pytest.raises(SdloraError) as e:
                app.load_model(session, library, str(path), offered, allow_any)
            messages[allow_any, str(path)] = str(e.value).replace(str(path), "PATH")
        assert len({m for (a, _), m in messages.items() if a == allow_any}) == 1, messages
    assert messages[False, str(folder)] == ("model 'PATH' is not offered by this app; pick one from the list (the "
                                            "app loads other models when started with --allow-any-model)")
    assert messages[True, str(folder)] == "model 'PATH' could not be loaded; the server's log says why"
    assert session.base.name == "tiny"  # a refused or failed model leaves the loaded one
    rows = app.load_model(session, library, "toy", offered, False)
    assert session.base.name == "toy" and rows == []
