"""Datasets as kohya users keep them (`N_words` concept folders, regularisation folders, captions) and `sdlora scan`:
one scan that `sdlora scan` prints and training runs first."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from sdlora.config import make_config
from sdlora.data.captions import PromptRules
from sdlora.data.kohya_folders import is_concept_parent, scan_dataset
from sdlora.data.schedule import epoch_batches
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from tests.helpers import make_images, run_main, train_tiny


def kohya_tree(root):
    """train/10_sks dog (3 images, one captioned), train/3_zwx cat (2 images), a stray folder and note; reg/1_dog
    (2 images, one captioned)."""
    dog = make_images(root / "train" / "10_sks dog", 3, seed=1)
    cat = make_images(root / "train" / "3_zwx cat", 2, size=(64, 96), seed=2)
    (dog / "img_0.txt").write_text("sks dog, on grass, sunny\n")
    (root / "train" / "misc").mkdir()
    (dog / "notes.md").write_text("not an image")
    (dog / "gone.txt").write_text("sks dog, deleted")
    reg = make_images(root / "reg" / "1_dog", 2, seed=3)
    (reg / "img_1.txt").write_text("a dog, indoors")
    return root / "train", root / "reg", dog, cat, reg


def test_kohya_parent_folders_are_concepts_with_repeats_and_prompts(tmp_path):
    train, reg, dog, cat, reg_dog = kohya_tree(tmp_path)
    assert is_concept_parent(train) and is_concept_parent(reg) and not is_concept_parent(dog)
    ds = scan_dataset(train, reg)
    assert [(c.name, c.repeats, c.prompt, len(c.images)) for c in ds.concepts] == [
        ("10_sks dog", 10, "sks dog", 3), ("3_zwx cat", 3, "zwx cat", 2)]
    assert [(c.name, c.repeats, c.prompt, len(c.images)) for c in ds.classes] == [("1_dog", 1, "dog", 2)]
    assert ds.problems() == []
    ignored = ds.ignored()
    assert any("misc: not a folder named N_words" in p for p in ignored) and any("notes.md" in p for p in ignored)
    assert any("gone.txt: a caption of no image" in p for p in ignored)
    ds.check(prompt=None)  # no --prompt needed: the folders name their prompts
    inst, cls = ds.examples(PromptRules("", ""), 64, None)
    captions = {(e.path.parent.name, e.path.name): e.caption for e in inst + cls}
    assert captions[("10_sks dog", "img_0.png")] == "sks dog, on grass, sunny"  # the caption wins
    assert captions[("10_sks dog", "img_1.png")] == "sks dog"  # else the folder's words
    assert captions[("3_zwx cat", "img_0.png")] == "zwx cat"
    assert captions[("1_dog", "img_1.png")] == "a dog, indoors" and captions[("1_dog", "img_0.png")] == "dog"
    # a caption lacking the concept's words gets them first, as --prompt's trigger does for a plain folder
    (cat / "img_1.txt").write_text("on a sofa")
    inst, _ = scan_dataset(train).examples(PromptRules("", ""), 64, None)
    assert {e.path.name: e.caption for e in inst if e.path.parent == cat}["img_1.png"] == "zwx cat, on a sofa"
    # the repeats reach the batch schedule: each image N × --repeats times per epoch
    seen = Counter(i for b in epoch_batches(inst, 2, 2, epoch=0, seed=5) for i in b)
    assert {inst[i].path.parent.name: n for i, n in seen.items()} == {"10_sks dog": 20, "3_zwx cat": 6}


def test_plain_folders_still_need_a_prompt_and_mixed_folders_are_plain(tmp_path):
    plain = make_images(tmp_path / "plain", 2)
    with pytest.raises(SdloraError, match="--prompt is required"):
        make_config({"images": str(plain), "model": "tiny"})
    cfg = make_config({"images": str(plain), "model": "tiny", "prompt": "sks dog"})
    ds = scan_dataset(cfg.images)
    assert [(c.repeats, c.prompt, len(c.images)) for c in ds.concepts] == [(1, None, 2)]
    make_images(plain / "5_extra", 1)  # images of its own: a plain folder; the subfolder is not read
    assert not is_concept_parent(plain)
    with pytest.raises(SdloraError, match="--class-images needs --class-prompt"):
        make_config({"images": str(plain), "prompt": "x", "class_images": str(plain)})
    train, reg, *_ = kohya_tree(tmp_path / "k")
    cfg = make_config({"images": str(train), "class_images": str(reg), "model": "tiny"})
    assert cfg.class_folder == reg and cfg.prompt is None


@pytest.mark.slow
def test_kohya_training_run_records_kohya_dataset_metadata(tmp_path):
    train, reg, *_ = kohya_tree(tmp_path)
    out = tmp_path / "out.safetensors"
    train_tiny(out, images=train, prompt=None, class_images=str(reg), prior_loss_weight=0.5, steps=2, resolution=64,
               no_cache=True)
    _, md = load(out)
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 3},
                                                 "3_zwx cat": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 2}}
    assert md["ss_num_train_images"] == str(10 * 3 + 3 * 2) and md["ss_num_reg_images"] == "2"
    freq = json.loads(md["ss_tag_frequency"])
    assert freq["10_sks dog"] == {"sks dog": 3, "on grass": 1, "sunny": 1}
    assert freq["3_zwx cat"] == {"zwx cat": 2} and freq["1_dog"] == {"dog": 1, "a dog": 1, "indoors": 1}
    assert md["modelspec.trigger_phrase"] == "sks dog, zwx cat"


def test_scan_prints_what_training_sees_and_exits_1_when_training_would_stop(tmp_path, capsys):
    def scan_cli(*args) -> subprocess.CompletedProcess:
        return run_main(capsys, "scan", *args)

    train, reg, dog, cat, _ = kohya_tree(tmp_path)
    tiny = make_images(tmp_path / "t" / "2_tiny thing", 1, size=(8, 8))
    p = scan_cli(train, "--class-images", reg, "--resolution", "64", "--buckets")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "instance 10_sks dog: 3 image(s) × 10 repeats, 1 with caption files, prompt 'sks dog'" in out
    assert "instance 3_zwx cat: 2 image(s) × 3 repeats" in out and "class 1_dog: 2 image(s) × 1 repeats" in out
    assert "img_0.png  80x64 -> " in out and "'sks dog, on grass, sunny'" in out
    assert "training sees 36 instance images per epoch (5 files), 2 class images" in out
    assert "misc: not a folder named N_words" in out and "notes.md: not an image or a caption" in out
    assert out.rstrip().endswith("0 problem(s)")
    p = scan_cli(tiny.parent, "--resolution", "64")
    assert p.returncode == 0 and "8x8 is smaller than 64x64" in p.stdout
    (cat / "img_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    p = scan_cli(train, "--resolution", "64")
    assert p.returncode == 1 and "img_1.png: cannot read it" in p.stdout and "training would stop" in p.stdout
    plain = make_images(tmp_path / "plain", 1)
    p = scan_cli(plain)
    assert p.returncode == 1 and "--prompt is required" in p.stdout
    # training stops on the same problem before any model loads
    with pytest.raises(SdloraError, match="img_1.png"):
        train_tiny(tmp_path / "x.safetensors", images=train, prompt=None, model="no/such-model")
