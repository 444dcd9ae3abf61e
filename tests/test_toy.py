"""The toy world, its judge and the pretrained toy base; DreamBooth on a held-out subject really learns it.

Every number here is measured on real models and real files; the thresholds come from measured runs (see the
comments next to them) with margins for what can legitimately vary (torch build, thread count).
"""

from __future__ import annotations

import json
import re
from dataclasses import fields

import numpy as np
import pytest
import torch

from sdlora.eval import toy_judge, toy_score
from sdlora.tiny import tiny_components
from sdlora.toy import BASE_DIR, TOY_RESOLUTION, toy_components, world
from tests.helpers import ROOT, run_main

SUBJECT_DIR = ROOT / "datasets" / "toy-purple-triangle"
SUBJECT, TRIGGER, CLASS = "a purple triangle", "a sks triangle", "a triangle"
N = 8  # images per prompt


def test_world_is_deterministic_and_pretraining_never_draws_held_out_subjects():
    a, b = world.render(world.sample_scene(123)), world.render(world.sample_scene(123))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and (a == b).all()
    drawn = {(s.colour, s.shape) for s in (world.sample_scene(i) for i in range(3000))}
    assert drawn == set(world.SEEN_COMBOS)
    assert ("purple", "triangle") not in drawn and not any(s == "ring" for _, s in drawn)
    assert world.parse_caption("a sks triangle on a gray background") == {"shape": "triangle", "background": "gray"}


def test_pretraining_steps_return_diffusers_ema_of_the_weights():
    """A few steps of the toy pretraining (the 20-minute run itself is not repeated): what comes back is diffusers'
    EMAModel average of the weights, decay 0 at the first update and min(decay, (1+n)/(10+n)) at update n."""
    from sdlora.toy import arch
    from sdlora.toy.pretrain import train_denoiser

    scenes = [world.sample_scene(i) for i in range(4)]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tok = arch.build_tokenizer()
    log: list[str] = []

    def weights(steps, decay):
        unet, te = train_denoiser(latents, scenes, tok, steps=steps, batch=2, lr=1.0, log=log.append, ema_decay=decay)
        assert not unet.training and not te.training
        return [p.detach().clone() for p in (*unet.parameters(), *te.parameters())]

    raw = [weights(n, 0.0) for n in (1, 2, 3)]  # decay 0: the weights after step n themselves
    ema = weights(3, 0.999)
    assert log[0].startswith("unet 1/1 loss ") and all(torch.isfinite(p).all() for p in ema)
    for p1, p2, p3, e in zip(*raw, ema):
        expected = p1 - (1 - 2 / 11) * (p1 - p2)
        expected = expected - (1 - 3 / 12) * (expected - p3)
        torch.testing.assert_close(e, expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(e, p3) for p3, e in zip(raw[2], ema))  # an average, not the last weights


def test_tokenizer_has_one_token_per_word_and_falls_back_to_characters():
    tok = toy_components()["tokenizer"]
    for w in world.WORDS:
        assert len(tok(w).input_ids) == 3, w  # <start> word <end>
    assert len(tok("zebra").input_ids) > 3


def test_judge_is_accurate_on_held_out_renders_clean_and_degraded():
    # Measured: 100.0% on 1000 clean and 1000 degraded (blur σ 0.3-1.2 px, noise, colour shift) renders of
    # every colour × shape (held-out ones included). A judge below 98% would make the base's figures meaningless.
    clean = toy_judge.accuracy_on_renders(400)
    degraded = toy_judge.accuracy_on_renders(400, degraded=True)
    assert clean["all"] >= 0.99, clean
    assert degraded["all"] >= 0.98, degraded
    blank = np.full((32, 32, 3), 120, np.uint8)
    assert toy_judge.judge(blank).shape == "none"


def test_toy_base_is_a_small_safetensors_diffusers_folder_sdlora_can_adapt():
    files = [p for p in BASE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    index = json.loads((BASE_DIR / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_DIR), safety_checker=None, requires_safety_checker=False)
    assert pipe.vae_scale_factor == 4
    c = toy_components()
    assert set(c) == set(tiny_components())
    from sdlora.lora.targets import find_targets
    from sdlora.models import load_base

    base = load_base("toy")
    assert base.name == "toy" and base.arch == "sd1" and base.native_resolution == TOY_RESOLUTION == 32
    assert any(n.endswith("attn2.to_q") for n in find_targets(base.unet, "unet", "default"))


@pytest.fixture(scope="session")
def base_run():
    """The toy base's judged images of the seen colour × shape prompts, the trigger and the class prompt."""
    from sdlora.models import load_base

    base = load_base("toy")
    cache: dict = {}
    prompts = [TRIGGER, CLASS] + world.seen_prompts(backgrounds=False)
    imgs = toy_score.generate(base, prompts, N)
    want = {TRIGGER: world.parse_caption(SUBJECT), CLASS: world.parse_caption(SUBJECT)}
    subj = toy_score.judged({p: imgs[p] for p in prompts[:2]}, want)
    acc = toy_score.judged({p: imgs[p] for p in prompts[2:]})
    cache[(tuple(prompts), N, 0)] = (subj, acc)
    return base, cache, subj, acc


@pytest.mark.slow
@pytest.mark.xdist_group("toy-base-run")
def test_toy_base_draws_what_seen_prompts_say(base_run):
    _, _, subj, acc = base_run
    print("\njudged accuracy per prompt:\n" + "\n".join(f"  {100 * a:5.1f}%  {p}" for p, a in acc.items()))
    mean = float(np.mean(list(acc.values())))
    # Measured on the committed base: 98.2% mean over the 14 seen colour × shape prompts (8 images each), the
    # worst prompt 75% ("a red triangle"); `python -m sdlora.toy report` measures 99.7% over the 42 prompts with
    # a background. Thresholds 90% mean / 50% worst: a base that gets one attribute of every 10th image wrong
    # fails, while a torch build's different float rounding (a few images flip, 0.9 points each) does not.
    assert mean >= 0.90, acc
    assert min(acc.values()) >= 0.5, acc
    # The subject is really new: the untrained trigger draws triangles of the seen colours, rarely purple.
    assert subj[TRIGGER] <= 0.25, subj


def _config(**values):
    """A TrainConfig from `values`, dropping optional settings this version of sdlora does not have."""
    from sdlora.config import TrainConfig, make_config

    optional = {"num_class_images", "no_cache"}
    known = {f.name for f in fields(TrainConfig)}
    return make_config({k: v for k, v in values.items() if k in known or k not in optional})


def _dreambooth(base, cache, tmp_path, seed: int, classes=None):
    from sdlora.train.loop import train

    out = tmp_path / f"purple-{seed}-{'prior' if classes else 'noprior'}.safetensors"
    prior = dict(class_prompt=CLASS, class_images=str(classes), num_class_images=40) if classes else {}
    train(_config(images=str(SUBJECT_DIR), prompt=TRIGGER, model="toy", steps=600, lr=1e-3, seed=seed,
                  out=str(out), no_cache=True, **prior), log=lambda *a: None)
    return out, toy_score.score_adapter(base, out, TRIGGER, SUBJECT, CLASS, n=N, base_cache=cache)


@pytest.mark.slow
@pytest.mark.xdist_group("toy-base-run")
def test_dreambooth_learns_a_held_out_subject_without_drifting_other_prompts(base_run, tmp_path, capsys):
    base, cache, _, _ = base_run
    classes = toy_score.class_images(base, CLASS, tmp_path / "class", n=40)
    runs = {}
    for seed, cls in ((0, classes), (1, classes), (0, None)):
        runs[seed, cls is not None] = _dreambooth(base, cache, tmp_path, seed, cls)
        print(f"\nDreamBooth 'a sks triangle' = purple triangle, 600 steps, seed {seed}, prior preservation "
              f"{'on' if cls else 'off'}:\n" + "\n".join(runs[seed, cls is not None][1].lines()))
    with_prior = [runs[0, True][1], runs[1, True][1]]
    # Measured (600 steps, lr 1e-3, rank 4, default preset, 40 class images, 8 images per prompt):
    #   prior on,  seed 0: subject fidelity 100.0%, class leak  0.0%, drift  -0.9 points
    #   prior on,  seed 1: subject fidelity  87.5%, class leak 12.5%, drift -14.3 points
    #   prior off, seed 0: subject fidelity  87.5%, class leak 25.0%, drift  -5.4 points
    # (base: 0% of 'a sks triangle' images are purple triangles; 98.2% prompt fidelity.) The seed spread is the
    # real uncertainty, so the thresholds hold for the mean of two seeds: most trigger images are the subject
    # (>= 75%, measured 93.8%), and other prompts stay within 15 points of the base (measured mean -7.6; one
    # image is 0.9 points of the mean).
    assert np.mean([s.subject_fidelity for s in with_prior]) >= 0.75
    assert min(s.subject_fidelity - s.subject_base for s in with_prior) >= 0.5
    assert np.mean([s.drift for s in with_prior]) >= -15.0
    assert np.mean([s.class_leak for s in with_prior]) <= 0.5  # 'a triangle' has not become 'a purple triangle'
    assert runs[0, False][1].subject_fidelity >= 0.5  # without prior preservation it learns too

    # The same adapter scored from the command line, which says what it does and counts the prompts done (the
    # base's 16 prompts, then the adapter's).
    out = runs[0, True][0]
    r = run_main(capsys, "eval", "--adapter", out, "--subject", SUBJECT, "-n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loading the toy base model\nscoring ")
    err = r.stderr.replace("\r", "\n")
    assert re.search(r"base model: 100%.*16/16", err), err[-2000:]
    assert re.search(r"with the adapter: 100%.*16/16", err), err[-2000:]
    assert "subject fidelity" in r.stdout and "prompt fidelity" in r.stdout and "'a sks triangle'" in r.stdout


def test_judged_scores_renders_of_known_scenes_and_drift_is_in_points():
    """toy_score's bookkeeping on images whose content is known (the world's own renders), no model: a prompt's
    accuracy is the share of its images the judge reads as the prompt says; `want` overrides what is asked for."""
    rng = np.random.default_rng(3)
    red = [world.render(world.place(rng, "red", "circle", "black")) for _ in range(4)]
    blue = [world.render(world.place(rng, "blue", "square", "white")) for _ in range(3)]
    acc = toy_score.judged({"a red circle": red, "a blue square": blue + red[:1]})
    assert acc == {"a red circle": 1.0, "a blue square": 0.75}
    assert toy_score.judged({"a sks thing": red}, {"a sks thing": {"colour": "blue"}}) == {"a sks thing": 0.0}
    s = toy_score.AdapterScore(0.75, 0.0, 0.125, 0.0, 0.90, 0.95, {"a": (0.95, 0.90)})
    assert s.drift == pytest.approx(-5.0)
    assert s.lines()[0].startswith("subject fidelity    75.0%") and "drift -5.0 points over 1 prompts" in s.lines()[2]
