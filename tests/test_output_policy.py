"""The output policy of every command (sdlora/guard.py): nothing the command did not create in this run is deleted or
replaced without --overwrite, never an input of the same run; folder outputs keep what sdlora did not write; generated
names never collide; a second writer of the same output is refused while the first holds it. Each case checks that
everything that existed before is unchanged byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.formats.file_io import load
from sdlora.guard import RECORD, OutputLock, lock_path, reserve
from tests.helpers import DOG, ROOT, train_tiny


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def refused(capsys, *args) -> str:
    """`sdlora ARGS` in-process: exit 2, one `sdlora: error:` line, no traceback."""
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    assert code == 2, cap.err + cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("sdlora: error:")]
    assert len(lines) == 1 and "Traceback" not in cap.err + cap.out, cap.err
    return lines[0]


@pytest.fixture(scope="session")
def adapter(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("policy") / "dog.safetensors", steps=2, rank=4, alpha=2).path


def _train(out, *extra):
    return ["train", "--images", DOG, "--prompt", "sks dog", "--model", "tiny", "--steps", "1", "--out", out, *extra]


def _user_folder(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("the user's own notes")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "photo.png").write_bytes(b"not really a png, but the user's")
    return d


# every command x each output hazard: (setup(tmp, adapter) -> argv, what the one line says)
CASES = {
    # an existing folder that is not sdlora's: never emptied (the old atomic folder write deleted it whole)
    "merge into a user's folder": (lambda t, a: ["merge", "--model", "tiny", "--lora", a, "--out",
                                                 _user_folder(t / "out")], "is a folder that is not empty"),
    "merge --overwrite into a user's folder": (
        lambda t, a: ["merge", "--model", "tiny", "--lora", a, "--out", _user_folder(t / "out"), "--overwrite"],
        "holds files sdlora did not write, so even --overwrite leaves it alone"),
    "convert --to peft into a user's folder": (
        lambda t, a: ["convert", a, _user_folder(t / "out"), "--to", "peft"], "is a folder that is not empty"),
    "convert --to peft --overwrite into a user's folder": (
        lambda t, a: ["convert", a, _user_folder(t / "out"), "--to", "peft", "--overwrite"],
        "holds files sdlora did not write"),
    # an existing file, without --overwrite
    "merge onto an existing file": (
        lambda t, a: ["merge", "--model", "tiny", "--lora", a, "--out", _file(t / "m.safetensors")],
        "already exists; choose another path, or pass --overwrite"),
    "resize onto an existing file": (lambda t, a: ["resize", a, "--rank", "2", "--out", _file(t / "r.safetensors")],
                                     "already exists; choose another path, or pass --overwrite"),
    "resize's default name taken": (lambda t, a: ["resize", _copy(a, t / "x.safetensors"), "--rank", "2"]
                                    if _file(t / "x-r2.safetensors") else [], "x-r2.safetensors already exists"),
    "convert onto an existing file": (lambda t, a: ["convert", a, _file(t / "c.safetensors"), "--to", "diffusers"],
                                      "already exists; choose another path, or pass --overwrite"),
    "generate onto an existing png": (lambda t, a: ["generate", "--model", "tiny", "--prompt", "x", "--steps", "1",
                                                    "--out", _file(t / "g.png")], "already exists"),
    "generate onto the numbered form of a png": (
        lambda t, a: ["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--num-images", "2",
                      "--out", t / "g.png"] if _file(t / "g-1.png") else [], "g-1.png already exists"),
    "train onto an earlier run's adapter": (lambda t, a: _train(_copy(a, t / "a.safetensors")),
                                            "already exists (an earlier run's adapter)"),
    "train onto an earlier run's loss curve": (lambda t, a: _train(t / "a.safetensors") if _file(t / "a-loss.png")
                                               else [], "a-loss.png is from an earlier run; pass --overwrite"),
    "train onto an earlier run's checkpoints": (
        lambda t, a: _train(t / "a.safetensors") if _file(t / "a-checkpoints" / "step-000002" / "manifest.json")
        else [], "pass --resume latest to continue that run, --overwrite to replace its checkpoints"),
    "train onto an earlier run's sample grids": (
        lambda t, a: _train(t / "a.safetensors", "--sample-every", "1") if _file(t / "a-samples" / "step-000001.png")
        else [], "a-samples is from an earlier run"),
    # an output that is an input of the same run (refused even with --overwrite)
    "merge --out is the --model file": (lambda t, a: ["merge", "--model", _file(t / "base.safetensors"), "--lora", a,
                                                      "--out", t / "base.safetensors", "--overwrite"],
                                        "is the input --model"),
    "merge --out is a --lora file": (lambda t, a: ["merge", "--model", "tiny", "--lora", _copy(a, t / "l.safetensors"),
                                                   "--out", t / "l.safetensors", "--overwrite"], "is the input --lora"),
    "merge --out folder holds the --lora": (lambda t, a: ["merge", "--model", "tiny", "--lora",
                                                          _copy(a, _sdlora_folder(t / "m") / "l.safetensors"),
                                                          "--out", t / "m", "--overwrite"], "holds the input --lora"),
    "resize --out is its input": (lambda t, a: ["resize", _copy(a, t / "x.safetensors"), "--rank", "2", "--out",
                                                t / "x.safetensors", "--overwrite"], "is the input FILE"),
    "convert output is its input": (lambda t, a: ["convert", _copy(a, t / "x.safetensors"), t / "x.safetensors",
                                                  "--to", "kohya", "--overwrite"], "is the input input"),
    "generate --out is a --lora": (lambda t, a: ["generate", "--model", "tiny", "--prompt", "x", "--lora",
                                                 _file(t / "l.png"), "--out", t / "l.png", "--overwrite"],
                                   "is the input --lora"),
    "train --out is the --model file": (lambda t, a: _train(_file(t / "base.safetensors"), "--model",
                                                            t / "base.safetensors", "--overwrite"),
                                        "is the base model --model"),
    "train --class-images is --images": (
        lambda t, a: ["train", "--images", _copytree(DOG, t / "dog"), "--prompt", "sks dog", "--model", "tiny",
                      "--out", t / "a.safetensors", "--class-prompt", "a dog", "--class-images", t / "dog",
                      "--num-class-images", "99"], "is the --images folder"),
    # names that are not what they should be
    "train --out notes.txt": (lambda t, a: _train(t / "notes.txt"), "must end in .safetensors"),
    "train --name ../x": (lambda t, a: _train(t / "a.safetensors")[:-2] + ["--output-dir", t, "--name", "../x"],
                          "must be a file name, not a path"),
    "train --name /abs": (lambda t, a: _train(t / "a.safetensors")[:-2] + ["--name", str(t / "abs")],
                          "must be a file name, not a path"),
    "resize --out notes.txt": (lambda t, a: ["resize", a, "--rank", "2", "--out", t / "notes.txt"],
                               "must end in .safetensors"),
    "convert output notes.txt": (lambda t, a: ["convert", a, t / "notes.txt", "--to", "kohya"],
                                 "must end in .safetensors"),
    "merge --out notes.txt": (lambda t, a: ["merge", "--model", "tiny", "--lora", a, "--out", t / "notes.txt"],
                              "write OUT.safetensors (a single file) or a folder"),
    "generate --out notes.txt": (lambda t, a: ["generate", "--model", "tiny", "--prompt", "x",
                                               "--out", t / "notes.txt"], "pass a .png path or a folder"),
}


def _file(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"something the user has: " + p.name.encode())
    return p


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def _copytree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sdlora_folder(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "model_index.json").write_text("{}")
    (d / RECORD).write_text("model_index.json\n")
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_to_damage_what_exists(case, capsys, tmp_path, adapter):
    setup, needle = CASES[case]
    argv = setup(tmp_path, adapter)
    before = snapshot(tmp_path, adapter.parent)
    t0 = time.perf_counter()
    line = refused(capsys, *argv)
    assert needle in line, line
    assert time.perf_counter() - t0 < 5  # before any model loads
    assert snapshot(tmp_path, adapter.parent) == before  # nothing that existed changed, byte for byte
    assert not [p for p in tmp_path.rglob(".*") if p.name != RECORD]  # no temp files or locks left behind


@pytest.fixture
def read_only(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip()[:80]})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("command", ["train", "merge", "merge-folder", "resize", "convert", "convert-peft",
                                     "generate", "generate-folder"])
def test_a_read_only_output_folder_is_refused_before_any_work(command, capsys, read_only, adapter):
    argv = {
        "train": _train(read_only / "a.safetensors"),
        "merge": ["merge", "--model", "tiny", "--lora", adapter, "--out", read_only / "m.safetensors"],
        "merge-folder": ["merge", "--model", "tiny", "--lora", adapter, "--out", read_only / "m"],
        "resize": ["resize", adapter, "--rank", "2", "--out", read_only / "r.safetensors"],
        "convert": ["convert", adapter, read_only / "c.safetensors", "--to", "diffusers"],
        "convert-peft": ["convert", adapter, read_only / "p", "--to", "peft"],
        "generate": ["generate", "--model", "tiny", "--prompt", "x", "--out", read_only / "g.png"],
        "generate-folder": ["generate", "--model", "tiny", "--prompt", "x", "--out", read_only / "imgs"],
    }[command]
    t0 = time.perf_counter()
    line = refused(capsys, *argv)
    assert "Read-only file system" in line and ("choose a writable" in line), line
    assert time.perf_counter() - t0 < 5
    assert list(read_only.iterdir()) == []


def test_overwrite_replaces_only_what_sdlora_wrote_in_a_folder(tmp_path, adapter, capsys):
    out = tmp_path / "peft"
    assert main(["convert", str(adapter), str(out), "--to", "peft"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert RECORD in written and "unet/adapter_model.safetensors" in written
    (out / "unet" / "my-notes.txt").write_text("keep me")  # the user adds a file to sdlora's folder
    (out / "unet" / "adapter_config.json").write_text("edited")  # and edits one sdlora wrote
    capsys.readouterr()
    assert "is a folder that is not empty" in refused(capsys, "convert", adapter, out, "--to", "peft")
    assert main(["convert", str(adapter), str(out), "--to", "peft", "--overwrite"]) == 0
    assert (out / "unet" / "my-notes.txt").read_text() == "keep me"
    assert json.loads((out / "unet" / "adapter_config.json").read_text())["peft_type"] == "LORA"  # sdlora's, replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp or old folder left beside it


def test_merge_into_an_empty_folder_and_again_with_overwrite(tmp_path, adapter):
    out = tmp_path / "merged"
    out.mkdir()
    assert main(["merge", "--model", "tiny", "--lora", str(adapter), "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / RECORD).is_file()
    (out / "README.txt").write_text("what I merged")
    first = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["merge", "--model", "tiny", "--lora", f"{adapter}:0.5", "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.txt").read_text() == "what I merged"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != first  # strength 0.5 now


def test_generated_names_never_collide_after_a_deletion(tmp_path):
    out = tmp_path / "images"
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--num-images", "3",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-0.png", "00001-1.png", "00002-2.png"]
    (out / "00001-1.png").unlink()  # counting the files would now give 2, the name of an existing image
    keep = snapshot(out)
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--out", str(out)]) == 0
    assert snapshot(out).items() >= keep.items()
    assert sorted(p.name for p in out.iterdir()) == ["00000-0.png", "00002-2.png", "00003-0.png"]


def _reserve_many(folder: str, n: int) -> list[str]:
    return [reserve(Path(folder), lambda i: f"{i:05d}.png").name for _ in range(n)]


def test_two_processes_reserving_names_in_one_folder_get_different_names(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        got = list(pool.map(_reserve_many, [str(tmp_path)] * 2, [30, 30]))
    assert len(set(got[0]) | set(got[1])) == 60


def test_cache_clear_deletes_only_sdlora_entries(tmp_path, capsys):
    cache = _user_folder(tmp_path / "my stuff")  # a wrong --dir / $SDLORA_CACHE naming a user's folder
    assert main(["train", "--images", str(DOG), "--prompt", "sks dog", "--model", "tiny", "--steps", "1",
                 "--no-text-encoder", "--no-eval-loss", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "a.safetensors")]) == 0
    (cache / "latents" / "mine.safetensors").write_bytes(b"a user's file inside the cache layout")
    user = {p: b for p, b in snapshot(cache).items() if "/latents/" not in str(p) and "/text/" not in str(p)}
    user[cache / "latents" / "mine.safetensors"] = (cache / "latents" / "mine.safetensors").read_bytes()
    entries = [p for p in cache.rglob("*.safetensors") if p.name != "mine.safetensors"]
    assert entries
    capsys.readouterr()
    assert main(["cache", "--dir", str(cache), "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"{len(entries)} entries" in out and "left alone" in out
    assert snapshot(cache) == user  # every entry gone, every other file as it was


# ---------------------------------------------------------------- one writer per output

HOLD = "import sys, time; from sdlora.guard import OutputLock; l = OutputLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path):
    """holder(path): a live process holding sdlora's lock on `path` until the test ends."""
    procs = []

    def hold(path: Path) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("command", ["train", "merge", "resize", "convert"])
def test_a_second_writer_of_the_same_output_is_refused(command, capsys, tmp_path, adapter, holder):
    out = tmp_path / ("m" if command == "merge" else "o.safetensors")
    argv = {"train": _train(out), "merge": ["merge", "--model", "tiny", "--lora", adapter, "--out", out],
            "resize": ["resize", adapter, "--rank", "2", "--out", out],
            "convert": ["convert", adapter, out, "--to", "kohya"]}[command]
    p = holder(out)
    line = refused(capsys, *argv)
    assert f"is being written by another sdlora run (pid {p.pid}" in line and "wait for it" in line, line
    assert not out.exists() and lock_path(out).exists()  # the holder's lock is left to the holder


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, adapter):
    out = tmp_path / "o.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "started": "1"}))
    assert main(["resize", str(adapter), "--rank", "2", "--out", str(out)]) == 0
    assert load(out)[0] and not lock_path(out).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with OutputLock(out):
            assert lock_path(out).exists()
            raise RuntimeError("the run failed")
    assert not lock_path(out).exists()
    with OutputLock(out):  # and can be taken again
        pass


def test_the_app_checks_its_output_folder_before_loading_a_model(tmp_path, read_only, capsys):
    sys.path.insert(0, str(ROOT))
    import app  # its main() in-process, as `python app.py` calls it: the exit code it returns, what it printed

    for outdir, needle in [(_file(tmp_path / "notes.txt"), "is a file; pass a folder"),
                           (read_only / "images", "Read-only file system")]:
        capsys.readouterr()
        code = app.main(["--model", "tiny", "--outdir", str(outdir)])
        out, err = capsys.readouterr()
        assert code == 2 and needle in err and "loading model" not in out, err
    assert (tmp_path / "notes.txt").read_bytes() == b"something the user has: notes.txt"
