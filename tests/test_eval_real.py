"""`sdlora eval` on a real-model path: DreamBooth prompts, CLIP-I/CLIP-T/DINO from local feature models.

Real CLIP/DINO weights cannot be downloaded here, so the tests save small random CLIP and ViT models to folders;
what is tested is the protocol and the arithmetic, not the published numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from sdlora.metrics import FeatureModels, dreambooth_prompts
from tests.conftest import DOG, ROOT


@pytest.fixture(scope="module")
def feature_dirs(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from sdlora.tiny import tiny_tokenizer

    d = tmp_path_factory.mktemp("features")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16))
    clip.save_pretrained(d / "clip")
    tok.save_pretrained(d / "clip")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8)).save_pretrained(d / "dino")
    return d


def test_prompt_lists_are_the_papers_25_per_kind():
    from sdlora.evaluate import PROMPTS_FILE

    live, objects = dreambooth_prompts(PROMPTS_FILE, live=True), dreambooth_prompts(PROMPTS_FILE, live=False)
    assert len(live) == len(objects) == 25
    assert "a {0} {1} wearing a santa hat" in live and "a {0} {1} wearing a santa hat" not in objects
    assert live[0] == objects[0] == "a {0} {1} in the jungle"


def test_identical_images_score_one_and_different_ones_less(feature_dirs):
    fm = FeatureModels(str(feature_dirs / "clip"), str(feature_dirs / "dino"))
    assert fm.skipped == {}
    dog = Image.open(DOG / "00.jpg")
    same = fm.score({"a dog": [dog]}, [dog])
    assert abs(same.values["CLIP-I"] - 1) < 1e-5 and abs(same.values["DINO"] - 1) < 1e-5
    other = fm.score({"a dog": [Image.new("RGB", (64, 64), (200, 30, 30))]}, [dog])
    assert other.values["CLIP-I"] < 0.999 and other.values["DINO"] < 0.999
    assert -1 <= other.values["CLIP-T"] <= 1


def test_eval_cli_scores_an_adapter_and_skips_missing_models_cleanly(trained, feature_dirs, tmp_path):
    base = [sys.executable, "-m", "sdlora", "eval", "--model", "tiny", "--adapter", str(trained.path),
            "--reference-images", str(DOG), "--class-noun", "dog", "-n", "1", "--steps", "2"]
    p = subprocess.run(base + ["--clip-model", str(feature_dirs / "clip"), "--dino-model", str(feature_dirs / "dino")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = {l.split()[0]: l for l in p.stdout.splitlines() if l.split() and l.split()[0] in ("DINO", "CLIP-I", "CLIP-T")}
    assert set(lines) == {"DINO", "CLIP-I", "CLIP-T"}
    for line in lines.values():
        value, base_value = float(line.split()[1]), float(line.split("base ")[1].rstrip(")"))
        assert -1 <= value <= 1 and -1 <= base_value <= 1
    missing = tmp_path / "no such model"
    p = subprocess.run(base + ["--clip-model", str(missing), "--dino-model", str(missing)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "nothing to score" in p.stdout and p.stdout.count("skipped:") == 3
