"""The `sdlora` command end to end: odd paths, bad input, Ctrl-C, config files. Runs that need a real process (the
console entry point, Ctrl-C, exit code as a user sees it) use subprocesses; the others call `sdlora.cli.main`
in-process with the same assertions on exit code, stdout and stderr (an interpreter start costs seconds), with one
subprocess error case kept."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from sdlora.formats.file_io import load
from tests.helpers import ROOT, SDLORA, error_line, main_error, make_images, run_main, run_sdlora, sub_env, train_tiny


def one_line_error(p: subprocess.CompletedProcess) -> str:
    return error_line(p.returncode, p.stderr)


@pytest.mark.slow
def test_train_end_to_end_with_spaces_and_non_ascii_paths(dog_copy, odd_dir, capsys):
    out_dir = odd_dir / "out put ö"
    p = run_main(capsys, "train", "--images", dog_copy, "--prompt", "sks dog", "--model", "tiny", "--steps", "12",
            "--output-dir", out_dir, "--rank", "2")
    assert p.returncode == 0, p.stderr
    path = out_dir / "dog pics.safetensors"  # default name: the images folder's name
    state, md = load(path)
    assert len(state) == 3 * 80 and md["ss_output_name"] == "dog pics" and md["ss_steps"] == "12"
    # the table of adapted modules, with the count check, and the progress bar with loss and ETA
    assert re.search(r"^unet\s+32\s", p.stdout, re.M) and re.search(r"^te\s+48\s", p.stdout, re.M), p.stdout
    assert "modules in the file" in p.stdout
    assert "total" in p.stdout and "data: 5 instance images (0 with caption files), 64px" in p.stdout
    assert "5 images × 1 repeats / batch 1 = 5 batches per epoch; 12 steps × 1 accumulation = 2.4 epochs" in p.stdout
    assert "12/12" in p.stderr and "loss=" in p.stderr and "<00:00" in p.stderr
    # beside it only the loss curve image; no temp files left behind
    assert sorted(f.name for f in out_dir.iterdir()) == ["dog pics-loss.png", "dog pics.safetensors"]


@pytest.mark.slow
def test_prior_preservation_and_options_from_a_toml_config(tmp_path, dog_copy, capsys):
    classes = make_images(tmp_path / "class imgs", n=3)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'images = "{dog_copy.as_posix()}"\nprompt = "sks dog"\nmodel = "tiny"\nsteps = 3\n'
                   f'class-prompt = "a dog"\nclass_images = "{classes.as_posix()}"\nprior_loss_weight = 0.5\n'
                   'rank = 8\n', encoding="utf-8")
    out = tmp_path / "o.safetensors"
    # flags override the file
    p = run_main(capsys, "train", "--config", cfg, "--rank", "2", "--no-text-encoder", "--num-class-images", "3",
                 "--out", out)
    assert p.returncode == 0, p.stderr
    state, md = load(out)
    assert md["ss_network_dim"] == "2" and md["ss_num_reg_images"] == "3" and md["ss_prior_loss_weight"] == "0.5"
    assert all(k.startswith("lora_unet_") for k in state)
    assert "3 class images" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--resolution", "30"], "--resolution must be a positive multiple of 8"),
    (["--class-images", "x"], "--class-images needs --class-prompt"),
    (["--mixed-precision", "fp16"], "fp16 needs a CUDA GPU"),
    (["--model", "no/such-model-anywhere"], "--model tiny"),
    (["--model", "weights.ckpt"], "pickle"),
])
def test_invalid_options_give_one_line_errors(args, needle, dog_copy, odd_dir, tmp_path, capsys):
    line = main_error(capsys, "train", "--images", dog_copy, "--prompt", "sks dog", "--model", "tiny", "--steps", "2",
                      "--out", tmp_path / "x.safetensors", *args)
    assert needle in line
    assert [p.name for p in tmp_path.iterdir()] == [odd_dir.name]  # no output, no temp file, no loss curve
    assert sorted(p.name for p in odd_dir.iterdir()) == ["dog pics"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_empty_folder_and_corrupt_images_are_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert "has no images" in main_error(capsys, "train", "--images", empty, "--prompt", "x", "--model", "tiny",
                                         "--output-dir", tmp_path / "out")
    assert [f.name for f in tmp_path.iterdir()] == ["empty"]

    folder = make_images(tmp_path / "imgs", n=2)
    good = (folder / "img_0.png").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (folder / "fake.png").write_bytes(b"this is not a png")
    # the console entry point in a real process: exit code 2 and the one line on stderr, nothing written
    p = run_sdlora("train", "--images", folder, "--prompt", "x", "--model", "tiny", "--steps", "1", cwd=tmp_path)
    line = one_line_error(p)
    assert "broken.jpg" in line and "fake.png" in line and "--skip-bad-images" in line
    assert sorted(f.name for f in tmp_path.iterdir()) == ["empty", "imgs"]
    from sdlora.cli import main

    out = tmp_path / "skip.safetensors"
    assert main(["train", "--images", str(folder), "--prompt", "x", "--model", "tiny", "--steps", "1",
                 "--skip-bad-images", "--out", str(out)]) == 0
    assert load(out)[1]["ss_num_train_images"] == "2"


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_saves_what_was_trained_so_far(tmp_path, dog_copy):
    out = tmp_path / "interrupted.safetensors"
    env = sub_env()
    proc = subprocess.Popen([*SDLORA, "train", "--images", str(dog_copy), "--prompt", "sks dog", "--model", "tiny",
                             "--steps", "100000", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    buf = ""
    deadline = time.time() + 120
    while time.time() < deadline and "/100000 [" not in buf.replace("0/100000 [", ""):
        buf += proc.stderr.read(1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: saving the" in stdout
    state, md = load(out)
    assert 0 < int(md["ss_steps"]) < 100000
    assert any(t.abs().sum() > 0 for k, t in state.items() if "lora_up" in k)


@pytest.mark.slow
def test_bf16_mixed_precision_and_gradient_checkpointing_train_on_cpu(tmp_path):
    for flags in ({"mixed_precision": "bf16"}, {"gradient_checkpointing": True}):
        result = train_tiny(tmp_path / "m.safetensors", steps=2, **flags)
        state, _ = load(result.path)
        ups = [t for k, t in state.items() if "lora_up" in k]
        assert all(t.dtype == torch.float32 for t in ups)
        assert sum(t.abs().sum() for t in ups) > 0, flags


@pytest.mark.slow
def test_save_precision_fp16_casts_every_tensor_alpha_included(tmp_path):
    state, _ = load(train_tiny(tmp_path / "h.safetensors", steps=1, save_precision="fp16").path)
    assert {t.dtype for t in state.values()} == {torch.float16}


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    from safetensors.torch import save_file

    from sdlora.formats.file_io import atomic_save

    path = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(2)}, path)
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(Exception):
        atomic_save({"a": shared, "b": shared}, path, {})  # safetensors refuses tensors sharing memory
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.parametrize("content,needle", [(b"\x80\x04\x95pickle", "pickle"),
                                            (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"", "truncated")])
def test_reading_a_pickle_or_truncated_adapter_is_a_clear_error(tmp_path, content, needle):
    from sdlora.errors import SdloraError

    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    with pytest.raises(SdloraError, match=needle):
        load(f)
    with pytest.raises(SdloraError, match="pickle"):
        load(tmp_path / "x.ckpt")


@pytest.mark.slow
def test_cache_command_counts_and_clears_the_entries_training_wrote(tmp_path, dog_copy, capsys):
    from sdlora.cli import main

    cache = tmp_path / "cache dir"
    p = run_main(capsys, "train", "--images", dog_copy, "--prompt", "sks dog", "--model", "tiny", "--steps", "1",
            "--no-text-encoder", "--cache-dir", cache, "--out", tmp_path / "a.safetensors")
    assert p.returncode == 0, p.stderr
    n = len(list(cache.rglob("*.safetensors")))
    assert n in (3, 4)  # latents as first needed: 2 for the fixed-noise eval, maybe 1 more for the step; 1 prompt
    assert main(["cache", "--dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith(f"{cache}: {n} entries, ")
    assert main(["cache", "--dir", str(cache), "--clear"]) == 0
    assert capsys.readouterr().out.startswith(f"cleared {cache}: {n} entries, ")
    assert not cache.exists()


def test_atomic_folder_write_replaces_whole_and_gets_normal_permissions(tmp_path):

    from sdlora.formats.file_io import atomic_write_dir

    out = tmp_path / "model"
    atomic_write_dir(out, lambda d: (d / "a.txt").write_text("one"))
    with pytest.raises(RuntimeError):
        atomic_write_dir(out, lambda d: ((d / "b.txt").write_text("two"), (_ for _ in ()).throw(RuntimeError("x"))))
    assert [p.name for p in out.iterdir()] == ["a.txt"]  # a failed write leaves the old folder as it was
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # and no temp folder behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
