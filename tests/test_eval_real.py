"""`sdlora eval` on a real-model path: DreamBooth prompts, CLIP-I/CLIP-T/DINO from local feature models.

Real CLIP/DINO weights cannot be downloaded here, so the tests save small random CLIP and ViT models to folders;
what is tested is the protocol and the arithmetic, not the published numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.eval.dreambooth_metrics import FeatureModels, dreambooth_prompts
from tests.helpers import DOG


@pytest.fixture(scope="session")
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
    from sdlora.eval.real_model import PROMPTS_FILE

    live, objects = dreambooth_prompts(PROMPTS_FILE, live=True), dreambooth_prompts(PROMPTS_FILE, live=False)
    assert len(live) == len(objects) == 25
    assert "a {0} {1} wearing a santa hat" in live and "a {0} {1} wearing a santa hat" not in objects
    assert live[0] == objects[0] == "a {0} {1} in the jungle"


def to_32px(im: Image.Image) -> Image.Image:
    """A square image at the feature models' input size (bicubic, as CLIP's and DINO's preprocessing resize)."""
    assert im.width == im.height
    return im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)


@pytest.fixture(scope="session")
def expected_scores(feature_dirs):
    """The paper's metrics computed here from the feature models' own modules, for images of the models' input size
    (32 px: no resize or crop): CLIP-I and DINO are the mean cosine over all generated x reference pairs, CLIP-T the
    mean cosine of each generated image with its own prompt."""
    from transformers import CLIPModel, CLIPTokenizer, ViTModel
    from transformers.utils.constants import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
    )

    clip = CLIPModel.from_pretrained(feature_dirs / "clip").eval()
    tok = CLIPTokenizer.from_pretrained(feature_dirs / "clip")
    dino = ViTModel.from_pretrained(feature_dirs / "dino").eval()

    def pixels(images, mean, std):
        assert all(im.size == (32, 32) for im in images)
        x = torch.tensor(np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in images]))
        return ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2).float()

    def cos(a, b):  # every row of a with every row of b
        a, b = a.double(), b.double()
        return (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])

    def clip_image(ims):
        pooled = clip.vision_model(pixel_values=pixels(ims, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).pooler_output
        return clip.visual_projection(pooled)

    def dino_cls(ims):
        return dino(pixel_values=pixels(ims, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)).last_hidden_state[:, 0]

    @torch.no_grad()
    def scores(generated: dict[str, list[Image.Image]], references: list[Image.Image]) -> dict[str, float]:
        images = [im for ims in generated.values() for im in ims]
        texts = []
        for prompt, ims in generated.items():
            t = clip.text_projection(clip.text_model(**tok([prompt], return_tensors="pt")).pooler_output)
            texts += cos(clip_image(ims), t).flatten().tolist()
        return {"CLIP-I": cos(clip_image(images), clip_image(references)).mean().item(),
                "CLIP-T": sum(texts) / len(texts),
                "DINO": cos(dino_cls(images), dino_cls(references)).mean().item()}

    return scores


def test_identical_images_score_one_and_different_ones_less(feature_dirs, expected_scores):
    fm = FeatureModels(str(feature_dirs / "clip"), str(feature_dirs / "dino"))
    assert fm.skipped == {}
    dog = Image.open(DOG / "00.jpg")  # 780 px: resized to the models' 32 px
    same = fm.score({"a dog": [dog]}, [dog])
    assert abs(same.values["CLIP-I"] - 1) < 1e-5 and abs(same.values["DINO"] - 1) < 1e-5
    small = [to_32px(Image.open(DOG / f"0{i}.jpg")) for i in range(3)]
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    generated = {"a dog on the beach": [small[0], red], "a red cube": [noise]}
    want = expected_scores(generated, small[1:])
    assert fm.score(generated, small[1:]).values == pytest.approx(want, abs=1e-5, rel=0)
    # each image is paired with its own prompt: pairing the images with the other prompt gives a clearly other CLIP-T
    swapped = expected_scores({"a red cube": [small[0], red], "a dog on the beach": [noise]}, small[1:])
    assert abs(swapped["CLIP-T"] - want["CLIP-T"]) > 1e-2
    # a different image scores measurably below an identical one
    other = fm.score({"a dog": [red]}, [small[1]]).values
    assert other == pytest.approx(expected_scores({"a dog": [red]}, [small[1]]), abs=1e-5, rel=0)
    assert other["CLIP-I"] < 0.99 and other["DINO"] < 0.99


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_eval_cli_reports_the_adapter_and_base_scores_of_the_dreambooth_protocol(trained, feature_dirs, expected_scores,
                                                                                capsys, monkeypatch):
    from sdlora.cli import main
    from sdlora.eval.real_model import PROMPTS_FILE
    from sdlora.infer.session import Session

    calls = []  # what `sdlora eval` generated: (settings, strengths, images); the real generate runs
    generate = Session.generate

    def recorded(self, settings, strengths, *a, **k):
        out = generate(self, settings, strengths, *a, **k)
        calls.append((settings, dict(strengths), [im for im, _ in out]))
        return out

    monkeypatch.setattr(Session, "generate", recorded)
    assert main(["eval", "--model", "tiny", "--adapter", str(trained.path), "--reference-images", str(DOG),
                 "--class-noun", "dog", "-n", "1", "--steps", "2", "--clip-model", str(feature_dirs / "clip"),
                 "--dino-model", str(feature_dirs / "dino")]) == 0
    out = capsys.readouterr().out
    lines = {l.split()[0]: l for l in out.splitlines() if l.split() and l.split()[0] in ("DINO", "CLIP-I", "CLIP-T")}
    assert set(lines) == {"DINO", "CLIP-I", "CLIP-T"}, out
    printed = {label: {m: float(l.split()[1] if label == "adapter" else l.split("(base ")[1].rstrip(")"))
                       for m, l in lines.items()} for label in ("adapter", "base")}
    # the protocol: the 25 live-subject prompts with "sks dog", one image each at seed 0 and 2 steps, with the adapter
    # at strength 1 and at 0 (the base); scored against the 5 dog photos, CLIP-T with the prompt without the trigger
    prompts = [t.format("sks", "dog") for t in dreambooth_prompts(PROMPTS_FILE, live=True)]
    assert len(prompts) == 25 and len(calls) == 50
    assert {(c[0].seed, c[0].steps, c[0].num_images, len(c[2])) for c in calls} == {(0, 2, 1, 1)}
    references = [to_32px(Image.open(p)) for p in sorted(DOG.glob("*.jpg"))]
    assert len(references) == 5
    want = {}
    for label, strength in (("adapter", 1.0), ("base", 0.0)):
        mine = [c for c in calls if set(c[1].values()) == {strength}]
        assert [c[0].prompt for c in mine] == prompts, label
        generated = {" ".join(c[0].prompt.replace("sks", "").split()): [to_32px(c[2][0])] for c in mine}
        assert "a dog in the jungle" in generated and len(generated) == 25
        want[label] = expected_scores(generated, references)
        assert printed[label] == pytest.approx(want[label], abs=5e-4 + 1e-6, rel=0), label  # printed with 3 decimals
    assert abs(want["adapter"]["CLIP-T"] - want["base"]["CLIP-T"]) > 3e-3  # the adapter's and the base's columns differ


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_eval_cli_skips_missing_feature_models_cleanly(trained, tmp_path, capsys):
    from sdlora.cli import main

    missing = tmp_path / "no such model"
    assert main(["eval", "--model", "tiny", "--adapter", str(trained.path), "--reference-images", str(DOG),
                 "--class-noun", "dog", "-n", "1", "--steps", "2", "--clip-model", str(missing),
                 "--dino-model", str(missing)]) == 0
    out = capsys.readouterr().out
    assert "nothing to score" in out and out.count("skipped:") == 3
    skipped = {l.split()[0]: l for l in out.splitlines() if " skipped: " in l}
    assert set(skipped) == {"DINO", "CLIP-I", "CLIP-T"} and all(repr(str(missing)) in l for l in skipped.values()), out


def test_eval_on_a_real_model_needs_the_reference_photos_and_class_noun(trained, capsys):
    """`sdlora eval --model <real>` without the DreamBooth protocol's inputs: one line naming both flags, before any
    model or metric network loads."""
    from tests.helpers import main_error

    err = main_error(capsys, "eval", "--adapter", trained.path, "--model", "tiny")
    assert err == ("sdlora: error: scoring on a real model needs --reference-images DIR (photos of the subject) and "
                   "--class-noun NOUN (e.g. dog)")
    err = main_error(capsys, "eval", "--adapter", trained.path, "--model", "tiny", "--reference-images", DOG,
                     "--class-noun", "dog", "--num-images", "0")
    assert err == "sdlora: error: --num-images must be at least 1, got 0"
