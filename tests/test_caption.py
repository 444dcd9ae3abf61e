"""`sdlora caption`: the toy captioner against the toy world's judge, BLIP and Florence-2 on tiny models built from
their configs (random weights, saved to a folder and loaded by the command as a hub id would be), a WD14 tagger
exported to ONNX with its tag list, `scan`'s token counts, and bad input (one line each)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, main_error, make_images, run_main

TOY = ROOT / "datasets" / "toy-purple-triangle"
WORDS = ["a", "purple", "triangle", "on", "grey", "background", "red", "circle", "photo", "of", "the", "small"]


def clip_count(text: str) -> int:
    """CLIP tokens of `text` without start/end, from the reference CLIP tokenizer (SD's own vocabulary)."""
    from sdlora.archs.clip_tokenizer import clip_tokenizer

    return len(clip_tokenizer()(text, add_special_tokens=False).input_ids)


def captions(folder) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt"))}


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ toy


def test_toy_captioner_names_what_the_judge_sees_and_keeps_existing_captions(tmp_path, capsys):
    from sdlora.data.images import decode
    from sdlora.eval.toy_judge import judge
    from sdlora.toy.world import parse_caption

    folder = shutil.copytree(TOY, tmp_path / "toy")
    images = sorted(folder.glob("*.png"))
    p = run_main(capsys, "caption", folder, "--captioner", "toy", "--prefix", "sks")
    assert p.returncode == 0, p.stderr
    assert f"wrote {len(images)} caption file(s) with the toy world's judge" in p.stdout
    written = captions(folder)
    assert sorted(written) == [i.with_suffix(".txt").name for i in images]  # one per image, none for README.md
    for image in images:
        text = written[image.with_suffix(".txt").name]
        v = judge(decode(image))
        assert text.startswith("sks, ")
        assert parse_caption(text) == {"colour": v.colour, "shape": v.shape, "background": v.background}
        assert (v.colour, v.shape) == ("purple", "triangle")  # the dataset's subject, as its README says
    assert no_temp_files(folder)

    # without --overwrite nothing is replaced, and the run says so
    (folder / "00.txt").write_text("my own words", encoding="utf-8")
    (folder / "01.txt").unlink()
    (folder / "01.caption").write_text("kohya caption", encoding="utf-8")
    p = run_main(capsys, "caption", folder, "--captioner", "toy")
    assert p.returncode == 0, p.stderr
    assert f"left {len(images)} image(s) that already have a caption as they were (pass --overwrite" in p.stdout
    assert (folder / "00.txt").read_text() == "my own words" and not (folder / "01.txt").exists()

    # --overwrite replaces them; --max-tokens cuts at a word boundary to the longest start that fits
    p = run_main(capsys, "caption", folder, "--captioner", "toy", "--overwrite", "--max-tokens", "3")
    assert p.returncode == 0 and f"replaced {len(images)} existing caption(s)" in p.stdout
    for image in images:
        v = judge(decode(image))
        full = f"a {v.colour} {v.shape} on a {v.background} background".split()
        text = (folder / f"{image.stem}.txt").read_text().strip()
        k = len(text.split())
        assert text.split() == full[:k] and clip_count(text) <= 3 < clip_count(" ".join(full[:k + 1]))
    assert no_temp_files(folder)


def test_caption_folder_on_kohya_concept_folders_returns_what_it_wrote(tmp_path):
    from sdlora.caption import caption_folder

    parent = tmp_path / "train"
    make_images(parent / "10_sks thing", 2)
    make_images(parent / "3_other", 1)
    shutil.copy(parent / "3_other" / "img_0.png", parent / "3_other" / "img_0.jpg")  # both would read img_0.txt
    lines = []
    report = caption_folder(parent, "toy", prefix="sks,", progress=False, log=lines.append)
    files = sorted(parent.glob("*/*.txt"))
    assert sorted(report.written) == files and len(files) == 3
    assert all(report.written[f] == f.read_text().strip() and f.read_text().startswith("sks, ") for f in files)
    assert report.shared == [parent / "3_other" / "img_0.png"]  # sorted by name: the .jpg came first
    assert lines == ["wrote 3 caption file(s) with the toy world's judge (offline); 1 image(s) share a caption file "
                     "with an image of the same name (img_0.png: img_0.txt); training reads that one caption for "
                     "both, so rename them to caption them apart"]


# ------------------------------------------------------------------ scan


def test_scan_shows_token_counts_and_what_77_tokens_cut_off(tmp_path, capsys):
    from sdlora.archs.clip_tokenizer import clip_tokenizer

    folder = make_images(tmp_path / "imgs", 2)
    long = "sks, " + ", ".join(f"tag number {i} of many" for i in range(30))  # with the trigger: trained as it is
    (folder / "img_0.txt").write_text(long, encoding="utf-8")
    (folder / "img_1.txt").write_text("sks, a short caption", encoding="utf-8")
    p = run_main(capsys, "scan", folder, "--resolution", "64", "--prompt", "sks")
    assert p.returncode == 0, p.stdout
    tok = clip_tokenizer()
    assert f"'sks, a short caption'  {len(tok('sks, a short caption').input_ids)}/77 tokens" in p.stdout
    assert f"  {len(tok(long).input_ids)}/77 tokens" in p.stdout
    line = next(ln for ln in p.stdout.splitlines() if "not read by CLIP" in ln)
    rest = line.split("reads on): '", 1)[1].split("…")[0]
    kept = long[:long.index(rest)]
    assert long.index(rest) > 0 and clip_count(kept) == 75  # the window reads 75 tokens of it and not the rest
    assert "1 caption(s) longer than CLIP's 77 tokens" in p.stdout


# ------------------------------------------------------------------ BLIP and Florence-2 (transformers)


@pytest.fixture(scope="session")
def tiny_hf_captioners(tmp_path_factory):
    """Tiny BLIP and Florence-2 captioners (random weights) with their processors, saved as a hub repo holds them."""
    import torch
    from transformers import (
        BartTokenizer,
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    root = tmp_path_factory.mktemp("captioners")
    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS)}
    blip_proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(vocab=vocab, bos_token="[DEC]"))
    cfg = BlipConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, bos_token_id=5, sep_token_id=3, pad_token_id=0,
                                      eos_token_id=3, max_position_embeddings=64),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    BlipForConditionalGeneration(cfg).save_pretrained(root / "blip")
    blip_proc.save_pretrained(root / "blip")

    bpe = ["<s>", "<pad>", "</s>", "<unk>"] + ["Ġ" + w for w in WORDS] + WORDS + list("abcdefghijklmnopqrstuvwxyzĠ?.")
    tok = BartTokenizer(vocab={t: i for i, t in enumerate(bpe)}, merges=[],
                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
                                do_center_crop=False)
    images.image_seq_length = (16 // 4) ** 2 + 1  # the vision tower's tokens at stride 4, plus its pooled one
    cfg = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tok), max_position_embeddings=64, encoder_layers=1,
                         encoder_ffn_dim=8, decoder_layers=1, decoder_ffn_dim=8, encoder_attention_heads=1,
                         decoder_attention_heads=1, d_model=8, eos_token_id=2, bos_token_id=0, pad_token_id=1,
                         decoder_start_token_id=2),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=12, projection_dim=8),
        image_token_id=tok.image_token_id)
    Florence2ForConditionalGeneration(cfg).save_pretrained(root / "florence2")
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(root / "florence2")
    return root


def reference_captions(name: str, model_dir, images) -> list[str]:
    """What the model writes for `images`, run here with transformers' documented calls."""
    import torch
    import transformers

    from sdlora.data.images import decode

    proc = transformers.AutoProcessor.from_pretrained(model_dir)
    ims = [decode(p) for p in images]
    with torch.inference_mode():
        if name == "blip":
            net = transformers.BlipForConditionalGeneration.from_pretrained(model_dir).eval()
            ids = net.generate(**proc(images=ims, return_tensors="pt"), max_new_tokens=62)  # its 64 positions
        else:
            net = transformers.Florence2ForConditionalGeneration.from_pretrained(model_dir).eval()
            inputs = proc(text=["<DETAILED_CAPTION>"] * len(ims), images=ims, return_tensors="pt")
            ids = net.generate(**inputs, max_new_tokens=62, num_beams=3, do_sample=False)
    return [" ".join(t.split()) for t in proc.batch_decode(ids, skip_special_tokens=True)]


@pytest.mark.parametrize("name", ["blip", "florence2"])
def test_transformers_captioners_on_tiny_models(name, tiny_hf_captioners, tmp_path, capsys):
    model_dir = tiny_hf_captioners / name
    folder = make_images(tmp_path / "imgs", 3)
    (folder / "img_2.txt").write_text("kept", encoding="utf-8")
    p = run_main(capsys, "caption", folder, "--captioner", name, "--captioner-model", model_dir, "--prefix", "sks",
                 "--max-tokens", "0", "--batch-size", "2", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "wrote 2 caption file(s)" in p.stdout and "left 1 image(s)" in p.stdout
    todo = [folder / "img_0.png", folder / "img_1.png"]
    want = reference_captions(name, model_dir, todo)
    assert all(want)  # random weights still write words
    assert captions(folder) == {"img_0.txt": f"sks, {want[0]}", "img_1.txt": f"sks, {want[1]}", "img_2.txt": "kept"}

    p = run_main(capsys, "caption", folder, "--captioner", name, "--captioner-model", model_dir, "--prefix", "sks",
                 "--max-tokens", "6", "--overwrite")
    assert p.returncode == 0 and "wrote 3 caption file(s)" in p.stdout, p.stderr
    got = captions(folder)
    assert len(got) == 3 and no_temp_files(folder)
    for image, full in zip(todo, want):
        text = got[image.with_suffix(".txt").name]
        body = text.removeprefix("sks, ")
        assert text.startswith("sks, ") and clip_count(text) <= 6
        assert full.startswith(body) and (body == full or clip_count(f"sks, {body} {full[len(body):].split()[0]}") > 6)


# ------------------------------------------------------------------ WD14 (onnxruntime)

TAGS = [("red_hair", 0), ("blue_sky", 0), ("general", 9), ("hatsune_miku", 4), ("1girl", 0), ("^_^", 0),
        ("solo", 0), ("other_character", 4)]
BIAS = [0.0, 0.0, 4.0, 3.0, -0.2, 1.0, -2.0, 1.0]  # fixed logits of the tags that do not look at the image


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory):
    """A WD14-style tagger: NHWC BGR 0..255 input, sigmoid outputs; tag 0 fires on red (R > B), tag 1 on blue, the
    others have fixed probabilities. A real conv net exported by torch.onnx, with selected_tags.csv beside it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, len(TAGS), 1)
            w = torch.zeros(len(TAGS), 3, 1, 1)
            w[0, 2], w[0, 0], w[1, 0], w[1, 2] = 0.1, -0.1, 0.1, -0.1  # BGR: channel 2 is red, channel 0 blue
            self.conv.weight.data, self.conv.bias.data = w, torch.tensor(BIAS)

        def forward(self, x):
            return torch.sigmoid(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))

    folder = tmp_path_factory.mktemp("wd14")
    torch.onnx.export(Tagger(), (torch.zeros(1, 16, 16, 3),), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}})
    rows = "".join(f"{i},{name},{cat},0\n" for i, (name, cat) in enumerate(TAGS))
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + rows, encoding="utf-8")
    return folder


def test_wd14_tagger_through_onnxruntime(tiny_tagger, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 24), (230, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (24, 40), (10, 10, 230)).save(folder / "blue.png")
    p = run_main(capsys, "caption", folder, "--captioner", "wd14", "--captioner-model", tiny_tagger,
                 "--batch-size", "2", "--max-tokens", "0")
    assert p.returncode == 0, p.stderr

    def expected(red: bool) -> str:
        # the image is padded to a square on white (R = B there), so the colour logit is 0.1 * (R - B) * its area
        logits = list(BIAS)
        v = 0.1 * 220 * (24 * 40) / 40 ** 2  # about: resampling moves it a little, far from any threshold
        logits[0], logits[1] = (v, -v) if red else (-v, v)
        probs = 1 / (1 + np.exp(-np.array(logits)))
        chars = sorted((-p, n) for p, (n, c) in zip(probs, TAGS) if c == 4 and p >= 0.85)
        general = sorted((-p, n) for p, (n, c) in zip(probs, TAGS) if c == 0 and p >= 0.35)
        return ", ".join(n if n == "^_^" else n.replace("_", " ") for _, n in chars + general)

    got = captions(folder)
    assert got == {"red.txt": expected(True), "blue.txt": expected(False)}
    assert got["red.txt"].startswith("hatsune miku, red hair, ") and "^_^" in got["red.txt"]  # the rule, by eye

    p = run_main(capsys, "caption", folder, "--captioner", "wd14", "--captioner-model", tiny_tagger, "--overwrite",
                 "--prefix", "sks", "--max-tokens", "6", "--threshold", "0.2")
    assert p.returncode == 0, p.stderr
    for name, text in captions(folder).items():
        tags = text.split(", ")
        assert tags[0] == "sks" and clip_count(text) <= 6 and len(tags) >= 2  # cut between tags, never inside one


# ------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    folder = make_images(tmp_path / "imgs", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    err = main_error(capsys, "caption", folder, "--captioner", "toy")
    assert "broken.png" in err and "--skip-bad-images" in err
    assert not list(folder.glob("*.txt"))  # refused before anything is written
    p = run_main(capsys, "caption", folder, "--captioner", "toy", "--skip-bad-images")
    assert p.returncode == 0 and "skipped 1 unreadable image(s)" in p.stdout
    assert sorted(captions(folder)) == ["img_0.txt", "img_1.txt"]

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    err = main_error(capsys, "caption", folder, "--captioner", "wd14", "--overwrite", "--skip-bad-images")
    assert "needs onnxruntime" in err and "pip install 'sdlora[caption]'" in err

    assert "no such folder" in main_error(capsys, "caption", tmp_path / "nope", "--captioner", "toy")
    err = main_error(capsys, "caption", folder, "--captioner", "toy", "--prefix", "a b c d e", "--max-tokens", "4")
    assert "--prefix 'a b c d e' is 5 CLIP tokens" in err
    err = main_error(capsys, "caption", folder, "--captioner", "blip", "--captioner-model", tmp_path / "no" / "model",
                     "--overwrite", "--skip-bad-images")
    assert "no such folder" in err
    (tmp_path / "empty").mkdir()
    err = main_error(capsys, "caption", folder, "--captioner", "blip", "--captioner-model", tmp_path / "empty",
                     "--overwrite", "--skip-bad-images")
    assert "cannot load it as a BLIP model" in err
    assert "no model to choose" in main_error(capsys, "caption", folder, "--captioner", "toy", "--captioner-model", "x")
    err = main_error(capsys, "caption", folder, "--captioner", "wd14", "--captioner-model", folder, "--overwrite",
                     "--skip-bad-images")
    assert "needs onnxruntime" in err
    monkeypatch.undo()
    if importlib.util.find_spec("onnxruntime"):
        err = main_error(capsys, "caption", folder, "--captioner", "wd14", "--captioner-model", folder,
                         "--overwrite", "--skip-bad-images")
        assert "no model.onnx or selected_tags.csv in it" in err


@pytest.mark.subprocess  # a fresh interpreter: what `sdlora caption --help` and an option error import
def test_help_and_option_errors_import_no_model_library(tmp_path):
    import subprocess

    probe = ("import sys\nfrom sdlora.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('HEAVY=' + ','.join(sorted(m for m in ('torch', 'transformers', 'onnxruntime') "
             "if m in sys.modules)))\nsys.exit(code)")
    for args, code, needle in [
            (["caption", "--help"], 0, "--max-tokens N cut each caption, prefix included, to at most N CLIP tokens"),
            (["caption", str(tmp_path / "nope"), "--captioner", "blip"], 2, "no such folder"),
            (["caption", str(TOY), "--captioner", "wd14", "--threshold", "2"], 2, "--threshold is a probability")]:
        p = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "100"})
        out = " ".join((p.stdout + p.stderr).split())
        assert p.returncode == code and needle in out, out
        assert p.stdout.splitlines()[-1] == "HEAVY=", out  # nothing heavy imported
