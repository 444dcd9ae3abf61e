"""Nothing lost, nothing unexplained (issue 11): every bad input is one line naming the problem and the fix (exit 2)
and writes or damages nothing; outputs are checked before any heavy work; a full disk never loses the weights;
hostile images and captions are decoded or refused by name; Ctrl-C at any phase says what was saved.

CLI cases run in-process (`sdlora.cli.main`); Ctrl-C during imports and the hostile-file-name run are real
subprocesses (terminal encoding, signals). Disk-full cases use a real small tmpfs (skipped where mounting is not
allowed). The image loader is fuzzed with hypothesis on a fixed budget.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config import make_config
from sdlora.data.captions import PromptRules, decode_caption, read_caption
from sdlora.data.examples import build_examples
from sdlora.data.images import checked_images, display_name, image_size, load_image, scan
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from sdlora.train.loop import train
from tests.helpers import DOG, ROOT, SDLORA, main_error, make_images, sub_env

# ---------------------------------------------------------------- helpers


def snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()}


def train_args(images: Path, out: Path, *extra) -> list:
    return ["train", "--images", images, "--prompt", "sks dog", "--model", "tiny", "--steps", "2", "--out", out, *extra]


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width × height pixels (what a decompression bomb looks like)."""
    b = bytearray(png_bytes(Image.new("L", (8, 8))))
    b[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8) + length(4) + type(4)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


@pytest.fixture
def dog(tmp_path) -> Path:
    d = tmp_path / "dog"
    shutil.copytree(DOG, d)
    return d


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, "size=256k") -> a fresh tmpfs folder; skips the test where mounting is not allowed."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ---------------------------------------------------------------- 1. every option validated, limit named

@pytest.mark.parametrize("args,needle", [
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**32)"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--sample-steps", "-3"], "--sample-steps must be at least 1, got -3"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--te-lr=-inf"], "--te-lr must be a finite number"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--noise-offset", "inf"], "--noise-offset must be a finite number"),
    (["--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--min-snr-gamma", "inf"], "--min-snr-gamma must be a finite number"),
    (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1)"),
    (["--resolution", "100000"], "--resolution must be at most 4096, got 100000; pass --force-resolution"),
    (["--rank", "2000"], "--rank must be at most 1024, got 2000"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_option_values_are_one_line_errors_naming_the_limit(capsys, tmp_path, args, needle):
    out = tmp_path / "out" / "x.safetensors"
    line = main_error(capsys, *train_args(DOG, out), *args)
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_limits_can_be_lifted_where_a_flag_says_so():
    cfg = make_config(dict(images="x", prompt="p", resolution=8192, force_resolution=True, seed=2**32 - 1, rank=1024))
    assert (cfg.resolution, cfg.seed, cfg.rank) == (8192, 2**32 - 1, 1024)


def test_rank_above_the_narrowest_layer_is_refused_after_the_model_loads(capsys, tmp_path):
    line = main_error(capsys, *train_args(DOG, tmp_path / "x.safetensors"), "--rank", "64")
    assert "--rank 64 is larger than the narrowest adapted layer of tiny" in line and "16 wide" in line
    assert "--rank 16 or lower" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,needle", [
    ("binary", "not a text file"),
    ("folder", "is a folder; pass a .toml file"),
    ("garbage", "invalid TOML"),
])
def test_unreadable_config_files_are_one_line_errors(capsys, tmp_path, kind, needle):
    cfg = tmp_path / "run.toml"
    if kind == "binary":
        cfg.write_bytes(bytes(range(256)) * 4)
    elif kind == "folder":
        cfg.mkdir()
    else:
        cfg.write_text("steps = = 3\n")
    assert needle in main_error(capsys, "train", "--config", cfg, "--images", DOG, "--prompt", "x")


# ---------------------------------------------------------------- 2. outputs checked before any heavy work

@pytest.mark.parametrize("case,needle", [
    ("training image", "is inside --images"),
    ("foreign file", "exists and is not a sdlora adapter; choose another path, or pass --overwrite"),
    ("folder", "is a folder; pass a file path"),
    ("parent is a file", "is a file, not a folder"),
    ("checkpoints in the way", "is in the way"),
    ("cache dir is a file", "choose another --cache-dir (or --no-cache)"),
])
def test_output_paths_are_refused_before_anything_loads(capsys, tmp_path, dog, case, needle):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    extra = []
    if case == "training image":
        out = dog / "00.jpg"
    elif case == "foreign file":
        out = notes
    elif case == "folder":
        out = tmp_path / "adapters"
        out.mkdir()
    elif case == "parent is a file":
        out = notes / "x.safetensors"
    elif case == "checkpoints in the way":
        out = tmp_path / "x.safetensors"
        (tmp_path / "x-checkpoints").write_text("a file where the checkpoint folder goes")
    else:
        out = tmp_path / "x.safetensors"
        extra = ["--cache-dir", notes / "cache"]
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    assert needle in main_error(capsys, *train_args(dog, out), *extra)
    assert snapshot(tmp_path) == before  # nothing written, nothing damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dog", "notes.txt"] + (["adapters"] if case == "folder" else [])
        + (["x-checkpoints"] if case == "checkpoints in the way" else []))
    assert time.perf_counter() - t0 < 5  # refused before the model loads


def test_a_subfolder_of_the_images_folder_is_a_fine_output_place(tmp_path, dog):
    from sdlora.outputs import check_paths

    plan = check_paths(make_config(dict(images=str(dog), prompt="x", out=str(dog / "output" / "a.safetensors"))))
    assert plan.checkpoints == dog / "output" / "a-checkpoints"  # not scanned: images are not searched recursively
    assert sorted(p.name for p in dog.iterdir()) == sorted(p.name for p in DOG.iterdir())  # nothing created


def _killed_save(target: Path, folder: bool = False) -> Path:
    """Run sdlora's own atomic writer for `target` in a forked child that is SIGKILLed halfway through the write;
    returns the temp file/folder it leaves behind."""
    from sdlora.formats.file_io import atomic_write, atomic_write_dir

    before = set(target.parent.iterdir()) if target.parent.exists() else set()
    pid = os.fork()
    if pid == 0:  # child: start the save, die in the middle of it
        def die(tmp):
            (Path(tmp) / "state.safetensors" if folder else Path(tmp)).write_bytes(b"half a save")
            os.kill(os.getpid(), signal.SIGKILL)

        try:
            (atomic_write_dir if folder else atomic_write)(target, die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (left,) = set(target.parent.iterdir()) - before
    return left


def test_a_read_only_class_folder_is_fine_when_it_holds_enough_images(capsys, mount_tmpfs, tmp_path):
    from sdlora.outputs import check_paths

    classes = mount_tmpfs("classes", "size=1m")
    make_images(classes, n=2)
    subprocess.run(["mount", "-o", "remount,ro", str(classes)], check=True)
    flags = dict(images=str(DOG), prompt="x", out=str(tmp_path / "a.safetensors"), class_prompt="a dog",
                 class_images=str(classes))
    assert check_paths(make_config(flags | {"num_class_images": 2})).class_folder is None  # only read
    with pytest.raises(SdloraError, match="cannot write to .*Read-only file system.* choose a writable --class-images"):
        check_paths(make_config(flags | {"num_class_images": 3}))  # one to generate


def test_overwrite_replaces_a_foreign_file_and_stale_temps_of_a_killed_save_are_removed(tmp_path):
    out = tmp_path / "run" / "notes.safetensors"
    out.parent.mkdir()
    out.write_text("not an adapter")
    # leftovers of saves killed with SIGKILL: the adapter's temp file and a checkpoint's temp folder (an hour
    # old), and the loss curve's temp file of a save that may still be running (fresh)
    stale_file = _killed_save(out)
    stale_dir = _killed_save(out.parent / "notes-checkpoints" / "step-000002", folder=True)
    young = _killed_save(out.parent / "notes-loss.png")
    old = time.time() - 3600
    for p in (stale_dir / "state.safetensors", stale_dir, stale_file):
        os.utime(p, (old, old))
    lines = []
    train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=1, out=str(out), overwrite=True)),
          log=lines.append)
    assert load(out)[1]["ss_steps"] == "1"
    assert not stale_file.exists() and not stale_dir.exists() and young.exists()
    text = "\n".join(map(str, lines))
    assert "removed 2 temp file(s) left by an interrupted save" in text
    assert "note: 1 recent temp file(s), maybe another run saving" in text and young.name in text


def test_a_read_only_output_folder_is_refused_up_front(capsys, mount_tmpfs, tmp_path):
    ro = mount_tmpfs("ro", "ro,size=64k")
    line = main_error(capsys, *train_args(DOG, ro / "sub" / "x.safetensors"))
    assert "cannot write to" in line and "Read-only file system" in line and "choose a writable --out" in line


def test_a_disk_too_small_for_the_run_is_refused_before_training(capsys, mount_tmpfs):
    small = mount_tmpfs("small", "size=256k")
    line = main_error(capsys, *train_args(DOG, small / "x.safetensors"), "--save-every", "1", "--keep-last", "0")
    assert "not enough disk space: this run writes about" in line and "free" in line
    assert list(small.iterdir()) == []


def _fill(folder: Path) -> None:
    with open(folder / "filler.bin", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_last_checkpoint_and_rescues_the_adapter(mount_tmpfs, tmp_path, monkeypatch):
    """The disk fills up after the first checkpoint: later checkpoints and the loss curve are skipped with a
    warning, training goes on, the final adapter lands in the rescue folder (bit-identical to a normal run's), and
    the one-line error says where it is."""
    disk = mount_tmpfs("disk", "size=4m")
    rescue = tmp_path / "rescue"
    monkeypatch.setenv("SDLORA_RESCUE_DIR", str(rescue))
    flags = dict(images=str(DOG), prompt="sks dog", model="tiny", steps=6, save_every=2, keep_last=1, seed=3, lr=1e-3)
    reference = train(make_config(flags | {"out": str(tmp_path / "ref" / "a.safetensors")}), log=lambda *a: None)

    out = disk / "run" / "a.safetensors"
    lines: list[str] = []

    def log(*a, **_k):
        msg = " ".join(map(str, a))
        lines.append(msg)
        if msg.startswith("checkpoint ") and "step-000002" in msg:
            _fill(disk)  # the disk is full from here on

    with pytest.raises(SdloraError) as e:
        train(make_config(flags | {"out": str(out)}), log=log)
    msg = str(e.value)
    assert "could not write the adapter" in msg and "No space left on device" in msg
    saved = rescue / "a.safetensors"
    assert f"it was saved to {saved} instead" in msg and "\n" not in msg
    got, ref = load(saved)[0], load(reference.path)[0]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    text = "\n".join(lines)
    assert "warning: checkpoint at step 4 not written (No space left on device)" in text
    assert "warning: loss curve not written" in text
    # the last good checkpoint survives whole (keep-last 1 did not prune it for a failed one); no partial files
    ck = disk / "run" / "a-checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002"]
    assert load(ck / "step-000002" / "adapter.safetensors")[1]["ss_steps"] == "2"
    leftovers = [p for p in disk.rglob("*") if p.is_file() and p.name != "filler.bin" and "step-000002" not in str(p)]
    assert leftovers == []


# ---------------------------------------------------------------- 3. checkpoints: corrupt ones, resume summary

@pytest.fixture(scope="session")
def checkpointed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = root / "a.safetensors"
    train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=4, save_every=2, keep_last=0,
                           out=str(out))), log=lambda *a: None)
    return out, root / "a-checkpoints" / "step-000002"


@pytest.mark.slow
@pytest.mark.xdist_group("robustness-checkpointed")
@pytest.mark.parametrize("damage,needle", [
    ("manifest garbage", "corrupt checkpoint manifest.json"),
    ("manifest binary", "corrupt checkpoint manifest.json"),
    ("manifest empty object", "corrupt checkpoint manifest.json (missing or malformed: format"),
    ("state truncated", "state.safetensors is truncated or corrupt"),
    ("state without weights", "lacks the LoRA weights"),
])
def test_a_damaged_checkpoint_is_a_one_line_error(capsys, tmp_path, checkpointed, damage, needle):
    out, good = checkpointed
    folder = tmp_path / "step-000002"
    shutil.copytree(good, folder)
    if damage == "manifest garbage":
        (folder / "manifest.json").write_text('{"format": 1, "step": ')
    elif damage == "manifest binary":
        (folder / "manifest.json").write_bytes(b"\x89PNG\x00\xff\xfe" * 50)
    elif damage == "manifest empty object":
        (folder / "manifest.json").write_text("{}")
    elif damage == "state truncated":
        data = (folder / "state.safetensors").read_bytes()
        (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, folder / "state.safetensors")
    before = snapshot(out.parent, tmp_path)
    line = main_error(capsys, "train", "--images", DOG, "--prompt", "sks dog", "--model", "tiny", "--steps", "4",
                   "--save-every", "2", "--keep-last", "0", "--out", out, "--resume", folder)
    assert needle in line and "start a new run" in line
    assert snapshot(out.parent, tmp_path) == before


@pytest.mark.slow
@pytest.mark.xdist_group("robustness-checkpointed")
def test_the_summary_after_a_resume_counts_the_steps_run_in_this_process(tmp_path, checkpointed):
    _, good = checkpointed
    lines: list[str] = []
    res = train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=5, save_every=2,
                                 keep_last=0, out=str(tmp_path / "a.safetensors"), resume=str(good))),
                log=lambda *a: lines.append(" ".join(map(str, a))))
    summary = next(line for line in lines if " steps in " in line)
    assert summary.startswith("3 steps in ") and "steps 3-5 after resuming" in summary
    assert res.steps == 5 and load(res.path)[1]["ss_steps"] == "5"


# ---------------------------------------------------------------- 4. Ctrl-C

@pytest.mark.slow
def test_ctrl_c_during_the_final_save_finishes_it_and_says_so(tmp_path):
    out = tmp_path / "a.safetensors"
    lines: list[str] = []

    def log(*a, **_k):
        msg = " ".join(map(str, a))
        lines.append(msg)
        if msg.startswith(f"saved {out}"):  # printed inside the save, after the file is written
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(make_config(dict(images=str(DOG), prompt="sks dog", model="tiny", steps=3, out=str(out))), log=log)
    text = "\n".join(lines)
    assert "Ctrl-C: finishing the save of the adapter" in text
    assert f"Ctrl-C during the save: the adapter {out} (3 steps) was saved completely" in text
    assert load(out)[1]["ss_steps"] == "3"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.slow
@pytest.mark.subprocess
def test_ctrl_c_during_imports_exits_130_without_a_traceback(tmp_path):
    proc = subprocess.Popen([*SDLORA, "train", "--images", str(DOG), "--prompt", "x", "--model", "tiny",
                             "--out", str(tmp_path / "x.safetensors")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=sub_env())
    deadline = time.time() + 60
    while time.time() < deadline:  # torch's library is mapped: the slow imports (diffusers, transformers) follow
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "sdlora: interrupted" in err
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- 5. images and captions

def test_decompression_bombs_are_refused_by_name_and_skipped_on_request(capsys, tmp_path):
    folder = make_images(tmp_path / "imgs", n=2)
    (folder / "bomb.png").write_bytes(bomb_png(30000, 30000))  # 900 MP: past Pillow's hard limit
    (folder / "big.png").write_bytes(bomb_png(10000, 10000))  # 100 MP: Pillow only warns; decoding takes GBs
    line = main_error(capsys, "train", "--images", folder, "--prompt", "x", "--model", "tiny",
                   "--out", tmp_path / "x.safetensors")
    assert "bomb.png (decompression bomb" in line and "big.png (decompression bomb" in line
    assert "--skip-bad-images" in line and not (tmp_path / "x.safetensors").exists()
    assert checked_images(folder, skip_bad=True) == [folder / "img_0.png", folder / "img_1.png"]
    warning = capsys.readouterr().out
    assert "skipping 2 unreadable image(s)" in warning and "bomb.png (decompression bomb" in warning


def _pixel(path: Path) -> np.ndarray:
    """The centre pixel of the loaded image, back in 0..255."""
    t = load_image(path, 8)
    return ((t[:, 4, 4] + 1) * 127.5).numpy()


@pytest.mark.parametrize("name,make,expected", [
    ("grey16.png", lambda: Image.fromarray(np.full((16, 16), 32768, np.uint16)), (128, 128, 128)),
    ("grey16-dark.png", lambda: Image.fromarray(np.full((16, 16), 8224, np.uint16)), (32, 32, 32)),
    ("grey32.tif", lambda: Image.fromarray(np.full((16, 16), 40000, np.int32)), (156, 156, 156)),
    ("float.tif", lambda: Image.fromarray(np.full((16, 16), 0.25, np.float32)), (64, 64, 64)),
    ("la-opaque.png", lambda: Image.new("LA", (16, 16), (60, 255)), (60, 60, 60)),
    ("la-clear.png", lambda: Image.new("LA", (16, 16), (60, 0)), (255, 255, 255)),
    ("palette.png", lambda: Image.new("RGB", (16, 16), (200, 30, 40)).convert("P", palette=Image.Palette.ADAPTIVE),
     (200, 30, 40)),
    ("palette-clear.png", lambda: _transparent_palette(), (255, 255, 255)),
    ("cmyk.tif", lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (255, 0, 0)),
    ("cmyk.jpg", lambda: Image.new("CMYK", (16, 16), (0, 0, 255, 0)), (255, 255, 0)),
    ("bilevel.png", lambda: Image.new("1", (16, 16), 1), (255, 255, 255)),
])
def test_every_image_mode_decodes_to_the_right_colour(tmp_path, name, make, expected):
    path = tmp_path / name
    make().save(path)
    assert scan(tmp_path).images == [path]
    tol = 6 if name.endswith(".jpg") else 1
    np.testing.assert_allclose(_pixel(path), expected, atol=tol)


def _transparent_palette() -> Image.Image:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    im.info["transparency"] = 0
    return im


def test_images_smaller_than_the_training_size_are_named(capsys, tmp_path):
    folder = make_images(tmp_path / "imgs", n=1, size=(128, 128))
    Image.new("RGB", (40, 64), "red").save(folder / "tiny face.png")
    build_examples(sorted(folder.glob("*.png")), PromptRules("x", "x"), 64, None)
    out = capsys.readouterr().out
    assert "warning: 1 image(s) smaller than the training size" in out and "tiny face.png (40x64 < 64x64)" in out
    assert "img_0" not in out and "lower --resolution" in out


@pytest.mark.parametrize("raw,expected", [
    ("sks dog, café".encode("utf-8"), "sks dog, café"),
    ("sks dog, café".encode("utf-8-sig"), "sks dog, café"),
    ("sks dog, café".encode("utf-16"), "sks dog, café"),  # BOM + little endian
    (b"\xfe\xff" + "sks dog, café".encode("utf-16-be"), "sks dog, café"),
    ("sks dog, café".encode("latin-1"), "sks dog, café"),
    ("sks dog, 5€ hat".encode("cp1252"), "sks dog, 5€ hat"),
    ("sks\u00a0dog, soft\u00adhyphen, zero\u200bwidth".encode("utf-8"), "sks dog, soft\u00adhyphen, zero\u200bwidth"),
])
def test_captions_in_any_common_encoding(tmp_path, raw, expected):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    (tmp_path / "a.txt").write_bytes(raw)
    assert read_caption(img) == expected


def test_a_binary_caption_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(SdloraError) as e:
        decode_caption(b"sks\x00\x01\x02 dog", tmp_path / "a.txt")
    assert "caption" in str(e.value) and "a.txt" in str(e.value) and "re-save it as UTF-8" in str(e.value)


@pytest.mark.slow
@pytest.mark.subprocess
def test_hostile_files_train_in_a_subprocess_and_the_second_run_hits_the_latent_cache(tmp_path):
    """A file name that is not UTF-8, a latin-1 caption, a 16-bit PNG and a decompression bomb (skipped), in a real
    `sdlora train` whose output goes to a pipe, as a user's terminal would get it. Then the same command again in
    a new process (another hash seed, so diffusers' config sets iterate in another order): every latent comes
    from the cache."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw_name = os.fsdecode(b"0caf\xe9 \x1b[31m.png")  # not UTF-8, with an escape sequence in it
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / raw_name)
    (folder / os.fsdecode(b"0caf\xe9 \x1b[31m.txt")).write_bytes("sks dog in a café".encode("latin-1"))
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(folder / "1grey16.png")
    (folder / "2bomb.png").write_bytes(bomb_png(30000, 30000))
    out = tmp_path / "o.safetensors"
    cache = tmp_path / "cache"
    args = [*SDLORA, *map(str, train_args(folder, out, "--skip-bad-images", "--steps", "1", "--cache-dir", cache,
                                                     "--overwrite"))]  # the second run replaces the first's adapter
    latents = []
    for hashseed in ("1", "2"):
        p = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=300, env=sub_env(PYTHONHASHSEED=hashseed))
        stdout, stderr = p.stdout.decode("utf-8"), p.stderr.decode("utf-8")
        assert p.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert "e.g. 0caf\\xe9 \\x1b[31m.png: 'sks dog in a café'" in stdout  # printable, escapes shown
        assert "2bomb.png (decompression bomb" in stdout
        assert "\x1b" not in stdout
        assert load(out)[1]["ss_num_train_images"] == "2"
        latents.append(next(line for line in stdout.splitlines() if line.startswith("latents:")))
    n = int(re.match(r"latents: 0 from cache, (\d) encoded", latents[0])[1])  # those one step and the eval need
    assert latents[1].startswith(f"latents: {n} from cache, 0 encoded")
    assert len(list((cache / "latents").rglob("*.safetensors"))) == n >= 2


def test_display_name_escapes_what_a_terminal_cannot_show():
    assert display_name(Path(os.fsdecode(b"a\xff\nb.png"))) == "a\\xff\\nb.png"
    assert display_name(Path("写真 ü.png")) == "写真 ü.png"


# ---------------------------------------------------------------- 6. the latent cache hits across processes

def test_cache_key_ignores_private_config_keys_but_not_real_ones(tmp_path):
    from sdlora.cache import fingerprint
    from sdlora.tiny import tiny_components

    vae = tiny_components("sd1")["vae"]
    key = fingerprint(vae)
    # the same VAE saved to a folder and loaded back (what a hub or folder model is): other `_name_or_path`,
    # `_diffusers_version`, `_use_default_values` order; same weights, same key
    from diffusers import AutoencoderKL

    vae.save_pretrained(tmp_path / "vae")
    again = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert dict(again.config) != dict(vae.config) and fingerprint(again) == key
    # a setting that changes the result changes the key
    changed = AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.5})
    changed.load_state_dict(vae.state_dict())
    assert fingerprint(changed) != key


# ---------------------------------------------------------------- 7. fuzzing the image loader

FUZZ_EXAMPLES = 150  # about 5 s on one CPU thread; derandomized, so CI runs the same examples every time


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    out = [png_bytes(rgb), png_bytes(rgb, "JPEG", quality=80), png_bytes(rgb, "WEBP"), png_bytes(rgb, "BMP"),
           png_bytes(rgb.convert("RGBA")), png_bytes(rgb.convert("LA")), png_bytes(rgb.convert("P")),
           png_bytes(_transparent_palette()), png_bytes(rgb.convert("CMYK"), "JPEG"),
           png_bytes(rgb.convert("CMYK"), "TIFF"),
           png_bytes(Image.fromarray(rng.integers(0, 65535, (12, 20), dtype=np.uint16))),
           png_bytes(Image.fromarray(rng.random((12, 20), dtype=np.float32)), "TIFF"), png_bytes(rgb.convert("1")),
           png_bytes(rgb, "GIF"), bomb_png(4000, 4000)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    out.append(png_bytes(rgb, "JPEG", exif=exif.tobytes()))
    return out


SEEDS = _seed_images()


@pytest.mark.slow
def test_fuzzed_image_files_load_or_fail_cleanly(tmp_path_factory, monkeypatch):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # Header mutations can claim any size; Pillow's bomb limit (lowered here so that fuzzing stays fast) bounds
    # the work, and the loader must honour whatever limit is set.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)
    root = tmp_path_factory.mktemp("fuzz")
    counter = iter(range(10**9))
    outcomes = {"loaded": 0, "refused by scan": 0, "refused by load": 0}

    mutation = st.one_of(
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
        st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16))),
    )

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, len(SEEDS) - 1), suffix=st.sampled_from([".png", ".jpg", ".webp", ".tif"]),
           mutations=st.lists(mutation, max_size=3))
    def check(seed, suffix, mutations):
        data = bytearray(SEEDS[seed])
        for kind, arg in mutations:
            if kind == "truncate":
                data = data[: int(arg * len(data))]
            elif kind == "flip":
                for where, byte in arg:
                    if data:
                        data[min(int(where * len(data)), len(data) - 1)] = byte
            else:
                where, junk = arg
                i = int(where * len(data))
                data[i:i] = junk
        folder = root / str(next(counter))
        folder.mkdir()
        path = folder / f"img{suffix}"
        path.write_bytes(bytes(data))
        res = scan(folder)  # must not raise: a bad file is listed with its reason
        assert res.images == [path] or [p for p, _ in res.bad] == [path]
        if res.images:
            try:
                w, h = image_size(path)
                t = load_image(path, (24, 16))
            except SdloraError:
                outcomes["refused by load"] += 1
                return
            assert w > 0 and h > 0
            outcomes["loaded"] += 1
            assert t.shape == (3, 16, 24) and torch.isfinite(t).all() and t.abs().max() <= 1.0
        else:
            reason = res.bad[0][1]
            assert reason and "\n" not in reason
            outcomes["refused by scan"] += 1
        shutil.rmtree(folder)

    t0 = time.perf_counter()
    check()
    print(f"fuzz: {outcomes} in {time.perf_counter() - t0:.1f}s")
    assert time.perf_counter() - t0 < 30
    assert outcomes["loaded"] > 10 and outcomes["refused by scan"] > 10  # both paths exercised
