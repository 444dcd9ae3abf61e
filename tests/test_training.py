"""DreamBooth features of `sdlora train` on the built-in tiny model: resume (bit-identical), manifests, content-keyed
caches, captions and the dataset summary, buckets, class-image generation, min-SNR / noise offset / TE learning rate,
sample grids / loss curve / TensorBoard, a 2-process run, and the presets in configs/."""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.archs import get as arch_spec
from sdlora.cache import EmbeddingCache, LatentCache
from sdlora.config import load_toml, make_config
from sdlora.data.examples import Example
from sdlora.data.images import load_image
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from sdlora.models import load_base
from sdlora.tiny import tiny_components
from sdlora.train import ckpt
from sdlora.train.step import Batch, DiffusionObjective, batch_loss, objective_for, sample_noise, scale_latents
from tests.helpers import CONFIGS, ROOT, SDLORA, assert_same_tensors, make_images, run_main, sub_env, train_tiny

# two CPU processes over gloo (with ACCELERATE_USE_CPU=1 in the environment); see test_two_process_gloo_run_...
ACCELERATE_2CPU = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"]
pytestmark = pytest.mark.usefixtures("cache_dir")  # every test its own latent/text cache


def state_of(path: Path) -> dict:
    return load(path)[1]


def mixed_aspect_images(folder: Path) -> Path:
    """Landscape, portrait and square images; two with caption sidecars (.txt and .caption), one without."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, (w, h) in {"img_0": (96, 64), "img_1": (48, 80), "img_2": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "img_0.txt").write_text("{trigger}, red, green, blue, yellow", encoding="utf-8")
    (folder / "img_1.caption").write_text("sks dog, sofa, lamp, rug", encoding="utf-8")
    return folder


# ---------------------------------------------------------------- resume

@pytest.fixture(scope="session")
def dreambooth(tmp_path_factory):
    """Run A: 6 steps, checkpoint at step 3, with every RNG stream and the data position in use: prior
    preservation, buckets of three shapes (instance and class images apart or together), tag shuffle, caption
    dropout, flips, gradient accumulation."""
    root = tmp_path_factory.mktemp("dreambooth")
    images = mixed_aspect_images(root / "inst")
    classes = make_images(root / "cls", 2, (64, 64), seed=9)
    settings = dict(steps=6, save_every=3, keep_last=0, class_prompt="a dog", class_images=str(classes),
                    num_class_images=2, grad_accum=2, buckets=True, shuffle_tags=True, keep_tags=1,
                    caption_dropout=0.25, cache_dir=str(root / "cache"))
    log: list[str] = []
    a = train_tiny(root / "a" / "a.safetensors", images, log=log.append, **settings)
    return SimpleNamespace(root=root, images=images, settings=settings, a=a, log=log,
                           ck=ckpt.checkpoint_root(a.path) / "step-000003")


@pytest.mark.slow
@pytest.mark.xdist_group("training-dreambooth")
def test_resumed_run_gives_the_bit_identical_adapter(dreambooth):
    d = dreambooth
    assert d.a.steps == 6
    assert [p.name for p in ckpt.list_checkpoints(d.ck.parent)] == ["step-000003"]  # none at the final step
    assert sorted(p.name for p in d.ck.iterdir()) == ["adapter.safetensors", "manifest.json", "state.safetensors"]
    manifest = json.loads((d.ck / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["position"]["micro"] == 3 * 2  # grad_accum 2
    state = load(d.ck / "state.safetensors")[0]
    assert {"rng/train", "rng/torch"} <= state.keys() and any(k.startswith("optim/") for k in state)

    log: list[str] = []
    b = train_tiny(d.root / "b" / "b.safetensors", d.images, log=log.append, resume=str(d.ck), **d.settings)
    assert b.steps == 6
    assert f"resumed from {d.ck} at step 3" in log
    final_a, final_b = load(d.a.path)[0], load(b.path)[0]
    assert_same_tensors(final_a, final_b)
    # the resumed half really trained: the step-3 adapter is not the final one
    at3 = load(d.ck / "adapter.safetensors")[0]
    assert sum(not torch.equal(at3[k], final_a[k]) for k in final_a if "lora_up" in k) > 0.9 * len(final_a) / 3


@pytest.mark.slow
@pytest.mark.xdist_group("training-dreambooth")
def test_bucketed_prior_preservation_run_reports_buckets_and_records_them(dreambooth):
    d = dreambooth
    assert "data: 3 instance images (2 with caption files), 2 class images ('a dog', loss weight 1.0), " \
           "3 aspect buckets" in d.log
    md = load(d.a.path)[1]
    assert md["ss_enable_bucket"] == "True" and md["ss_num_reg_images"] == "2"


@pytest.mark.slow
@pytest.mark.xdist_group("training-dreambooth")
def test_resume_refuses_other_settings_edited_images_and_folders_without_state(dreambooth, tmp_path):
    d = dreambooth

    def refused(**changes) -> str:
        with pytest.raises(SdloraError) as e:
            train_tiny(tmp_path / "r.safetensors", d.images, **(d.settings | changes))
        msg = str(e.value)
        assert "\n" not in msg
        assert not (tmp_path / "r.safetensors").exists()
        return msg

    msg = refused(resume=str(d.ck), rank=2)
    assert "settings differ (rank: checkpoint 4, now 2)" in msg
    assert "prompt" not in msg  # only what differs is named
    assert "noise_offset: checkpoint 0.0, now 0.05" in refused(resume=str(d.ck), noise_offset=0.05)

    edited = d.images / "img_1.png"
    original = edited.read_bytes()
    try:
        w, h = Image.open(edited).size
        Image.new("RGB", (w, h), (0, 128, 255)).save(edited)  # same size, other pixels
        msg = refused(resume=str(d.ck))
        assert "the training images changed (img_1.png)" in msg
    finally:
        edited.write_bytes(original)

    no_state = tmp_path / "copied-adapter-only"
    no_state.mkdir()
    (no_state / "adapter.safetensors").write_bytes((d.ck / "adapter.safetensors").read_bytes())
    (no_state / "manifest.json").write_text((d.ck / "manifest.json").read_text())
    assert "not a checkpoint folder" in refused(resume=str(no_state))
    assert "no checkpoint in" in refused(resume="latest")  # nothing was ever saved beside r.safetensors


SIGINT_FLAGS = dict(steps=12, save_every=5, keep_last=0, shuffle_tags=True, caption_dropout=0.25)


def _sigint_args(images: Path, out: Path) -> list[str]:
    return [*SDLORA, "train", "--images", str(images), "--prompt", "sks dog", "--model", "tiny", "--lr", "1e-3",
            "--out", str(out), "--steps", "12", "--save-every", "5", "--keep-last", "0", "--shuffle-tags",
            "--caption-dropout", "0.25"]


@pytest.fixture(scope="session")
def interrupted(tmp_path_factory):
    """An uninterrupted 12-step run in-process, and the same run as `sdlora train` in a subprocess, interrupted with
    SIGINT in the middle of step 8 (half a step after the progress bar showed step 7), as a user's Ctrl-C lands."""
    root = tmp_path_factory.mktemp("sigint")
    cache = root / "cache"
    images = mixed_aspect_images(root / "inst")
    reference = train_tiny(root / "ref" / "ref.safetensors", images, cache_dir=str(cache), **SIGINT_FLAGS)
    out = root / "int" / "int.safetensors"
    env = sub_env(cache) | {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}  # the bar shows every step
    proc = subprocess.Popen(_sigint_args(images, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    buf, seen, deadline = "", {}, time.time() + 240
    while 7 not in seen and time.time() < deadline:
        ch = proc.stderr.read(1)
        if not ch:
            break
        buf += ch
        if ch == "[" and (m := re.search(r"(\d+)/12 \[$", buf)):
            seen.setdefault(int(m.group(1)), time.perf_counter())
    assert {6, 7} <= seen.keys(), buf[-2000:]
    time.sleep((seen[7] - seen[6]) / 2)  # step 7 took this long; step 8 is now half done
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    # the step under way when Ctrl-C came (8) is finished, then saved
    k = int(re.search(r"interrupted: saving the (\d+) steps trained so far", stdout).group(1))
    assert k == 8, stdout
    return SimpleNamespace(root=root, cache=cache, images=images, reference=reference, out=out, k=k)


@pytest.mark.slow
@pytest.mark.xdist_group("training-sigint")
@pytest.mark.subprocess  # its fixture: the Ctrl-C of a real `sdlora train`
def test_interrupted_subprocess_resumed_from_its_checkpoint_equals_the_uninterrupted_run(interrupted, capsys,
                                                                                         monkeypatch):
    d = interrupted
    monkeypatch.setenv("SDLORA_CACHE", str(d.cache))
    saved = ckpt.checkpoint_root(d.out) / "step-000005"  # written by --save-every before the interruption
    assert state_of(d.out)["ss_steps"] == str(d.k)  # Ctrl-C also saved the adapter trained so far
    out = d.root / "res" / "res.safetensors"
    p = run_main(capsys, *_sigint_args(d.images, out)[len(SDLORA):], "--resume", saved)  # in-process
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {saved} at step 5" in p.stdout
    assert_same_tensors(load(d.reference.path)[0], load(out)[0])


# Ctrl-C lands in the middle of a step; the loop finishes that step, then checkpoints it: the checkpoint's data
# position and RNG state belong to its step count, so resuming from it continues exactly.
@pytest.mark.slow
@pytest.mark.xdist_group("training-sigint")
@pytest.mark.subprocess  # its fixture: the Ctrl-C of a real `sdlora train`
def test_ctrl_c_checkpoint_then_resume_latest_equals_the_uninterrupted_run(interrupted, capsys, monkeypatch):
    d = interrupted
    monkeypatch.setenv("SDLORA_CACHE", str(d.cache))
    latest = ckpt.list_checkpoints(ckpt.checkpoint_root(d.out))[-1]
    manifest = json.loads((latest / "manifest.json").read_text())
    assert latest.name == f"step-{d.k:06d}" and manifest["step"] == d.k
    p = run_main(capsys, *_sigint_args(d.images, d.out)[len(SDLORA):], "--resume", "latest")  # in-process
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {latest} at step {d.k}" in p.stdout
    # a checkpoint of step k holds the data position after step k, as the --save-every ones do (micro 5 at 5)
    assert manifest["position"]["micro"] == d.k, manifest["position"]
    assert_same_tensors(load(d.reference.path)[0], load(d.out)[0])


# ---------------------------------------------------------------- caches

@pytest.mark.slow
def test_second_run_reads_latents_and_text_embeddings_from_the_disk_cache(tmp_path, cache_dir):
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    logs: list[list[str]] = [[], []]
    for i in range(2):
        train_tiny(tmp_path / f"o{i}.safetensors", images, log=logs[i].append, steps=1, no_text_encoder=True)
        if i == 0:
            text_entries = sorted((cache_dir / "text").rglob("*.safetensors"))
    # one step: only what it and the fixed-noise eval need is encoded (2 images unflipped, maybe 1 flipped), not all
    # 2 × (plain, flipped) up front; the second run (same seed, same draws) reads exactly those from the disk cache
    first = next(line for line in logs[0] if line.startswith("latents:"))
    n = int(re.fullmatch(rf"latents: 0 from cache, (\d) encoded \({re.escape(str(cache_dir))}\)", first)[1])
    assert n in (2, 3)
    assert f"latents: {n} from cache, 0 encoded ({cache_dir})" in logs[1]
    assert len(list((cache_dir / "latents").rglob("*.safetensors"))) == n
    assert len(text_entries) >= 1  # frozen text encoder: prompts are cached...
    assert sorted((cache_dir / "text").rglob("*.safetensors")) == text_entries  # ...and reused, not re-encoded


@pytest.mark.slow
@pytest.mark.parametrize("source", ["built-in", "diffusers folder"])
def test_vae_and_frozen_text_encoder_leave_memory_once_cached_and_come_back_whole(tmp_path, cache_dir, source):
    """Latents are encoded when first needed; once every one is cached (2 images, no flips: the fixed-noise eval
    needs both) the VAE and the frozen text encoder (one fixed prompt) leave memory. A sample grid after that
    reloads them (a built-in model is rebuilt, a diffusers folder's components are read again); the result's model
    is whole again on access, weight for weight the base model; a second run, every latent from the disk cache,
    trains the identical adapter (draws do not depend on the cache)."""
    model = "tiny"
    if source == "diffusers folder":
        model = str(tmp_path / "tiny-folder")
        load_base("tiny").pipeline().save_pretrained(model)
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    logs: list[list[str]] = [[], []]
    results = [train_tiny(tmp_path / f"o{i}.safetensors", images, log=logs[i].append, steps=3, no_flip=True,
                   no_text_encoder=True, sample_every=3, sample_steps=2, model=model) for i in range(2)]
    assert f"latents: 0 from cache, 2 encoded ({cache_dir})" in logs[0]
    assert f"latents: 2 from cache, 0 encoded ({cache_dir})" in logs[1]
    a = results[0]
    assert a.samples and a.samples[-1].name == "step-000003.png"  # drawn with the reloaded VAE and text encoder
    for attr in ("vae", "text_encoder"):
        assert all(p.is_meta for p in a.model.modules[attr].parameters()), attr  # released, not yet reloaded
    whole, fresh = a.base, load_base(model)
    for attr in ("vae", "text_encoder"):
        assert_same_tensors(whole.modules[attr].state_dict(), fresh.modules[attr].state_dict())
    assert_same_tensors(load(a.path)[0], load(results[1].path)[0])


def test_latent_cache_keys_on_file_bytes_size_flip_and_vae_weights(tmp_path):
    vae = tiny_components()["vae"]
    img = make_images(tmp_path / "i", 1, (64, 64), seed=3) / "img_0.png"
    ex = Example(img, "c", (64, 64))
    folder = tmp_path / "cache"

    first = LatentCache(vae, folder)
    mean, std = first.get(ex, False)
    assert (first.store.hits, first.store.misses) == (0, 1)
    assert mean.shape == (4, 8, 8) and (std > 0).all()
    again = LatentCache(vae, folder)  # the next run: read from disk, identical
    assert torch.equal(again.get(ex, False)[0], mean)
    assert (again.store.hits, again.store.misses) == (1, 0)
    assert again.key(ex, True) != again.key(ex, False)

    # the image is edited in place: same size, other pixels -> re-encoded, a different latent
    arr = np.asarray(Image.open(img)).copy()
    arr[:32] = 255 - arr[:32]
    Image.fromarray(arr).save(img)
    edited = LatentCache(vae, folder)
    new_mean = edited.get(ex, False)[0]
    assert (edited.store.hits, edited.store.misses) == (0, 1)
    assert (new_mean - mean).abs().max() > 1e-2
    with torch.no_grad():
        direct = vae.encode(load_image(img, (64, 64))[None]).latent_dist.mean[0]
    torch.testing.assert_close(new_mean, direct, rtol=1e-5, atol=1e-6)

    # another bucket -> another key and shape
    wide = Example(img, "c", (80, 48))
    assert edited.key(wide, False) != edited.key(ex, False)
    assert edited.get(wide, False)[0].shape == (4, 6, 10)
    # a VAE with other weights -> another key; the same weights in another object -> the same key
    other = copy.deepcopy(vae)
    with torch.no_grad():
        next(other.parameters()).flatten()[0] += 1e-3
    assert LatentCache(other, folder).key(ex, False) != edited.key(ex, False)
    assert LatentCache(copy.deepcopy(vae), folder).key(ex, False) == edited.key(ex, False)

    # a damaged entry is rebuilt, never trusted
    entry = next(folder.rglob(f"{edited.key(ex, False)}.safetensors"))
    entry.write_bytes(b"garbage")
    rebuilt = LatentCache(vae, folder)
    assert torch.equal(rebuilt.get(ex, False)[0], new_mean) and rebuilt.store.misses == 1


def test_cache_entries_do_not_depend_on_the_run_s_mixed_precision(tmp_path):
    """A run computes entries inside its autocast (--mixed-precision bf16): they must still be the module's own-dtype
    result, since the key is the weights and not the run. (A bf16 run's latents once reached a later fp32 run.)"""
    c = tiny_components()
    ex = Example(make_images(tmp_path / "i", 1, (64, 64), seed=4) / "img_0.png", "c", (64, 64))
    with torch.no_grad():
        direct = c["vae"].encode(load_image(ex.path, (64, 64))[None]).latent_dist.mean[0]
        hidden = final_hidden(c["tokenizer"], c["text_encoder"], ["sks dog"])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the bf16 run would have cached
            assert (c["vae"].encode(load_image(ex.path, (64, 64))[None]).latent_dist.mean[0] - direct).abs().max() > 0
    for autocast in (True, False):
        folder = tmp_path / f"cache-{autocast}"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mean = LatentCache(c["vae"], folder).get(ex, False)[0]
            h = EmbeddingCache([(c["tokenizer"], c["text_encoder"])], arch_spec("sd1"), folder).get(["sks dog"])[0]
        assert torch.equal(mean, direct) and torch.equal(h, hidden)


def final_hidden(tok, te, prompts):
    """SD 1.x conditioning computed here: CLIP's last hidden state (after the final layer norm), 77 tokens."""
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return te(ids).last_hidden_state


def test_text_embedding_cache_keys_on_prompt_and_text_encoder_weights(tmp_path):
    c = tiny_components()
    tok, te = c["tokenizer"], c["text_encoder"]
    folder = tmp_path / "cache"
    first = EmbeddingCache([(tok, te)], arch_spec("sd1"), folder)
    h, pooled = first.get(["sks dog"])
    assert h.shape == (1, 77, 32) and pooled is None and first.store.misses == 1
    with torch.no_grad():
        torch.testing.assert_close(h, final_hidden(tok, te, ["sks dog"]), rtol=0, atol=0)
    again = EmbeddingCache([(tok, te)], arch_spec("sd1"), folder)
    assert torch.equal(again.get(["sks dog"])[0], h) and (again.store.hits, again.store.misses) == (1, 0)
    cat = again.get(["a cat"])[0]
    assert again.store.misses == 1 and (cat - h).abs().max() > 1e-3

    other = copy.deepcopy(te)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.endswith("final_layer_norm.bias")).add_(0.1)
    changed = EmbeddingCache([(tok, other)], arch_spec("sd1"), folder)
    h2 = changed.get(["sks dog"])[0]
    assert (changed.store.hits, changed.store.misses) == (0, 1)
    with torch.no_grad():
        torch.testing.assert_close(h2, final_hidden(tok, other, ["sks dog"]), rtol=0, atol=0)
    assert (h2 - h).abs().max() > 0.05


# ---------------------------------------------------------------- captions, summary, epochs

@pytest.mark.slow
def test_dataset_summary_epochs_arithmetic_and_tag_frequency(tmp_path):
    images = make_images(tmp_path / "pets", 3, (64, 64))
    (images / "img_0.txt").write_text("{trigger}, red ball, grass", encoding="utf-8")
    (images / "img_1.caption").write_text("red ball", encoding="utf-8")
    log: list[str] = []
    r = train_tiny(tmp_path / "o.safetensors", images, log=log.append, epochs=2, repeats=2, batch_size=3, steps=500)
    assert "data: 3 instance images (2 with caption files), 64px" in log
    assert [l for l in log if l.startswith("  e.g.")] == [
        "  e.g. img_0.png: 'sks dog, red ball, grass'",  # {trigger} substituted
        "  e.g. img_1.png: 'sks dog, red ball'",  # trigger put first
        "  e.g. img_2.png: 'sks dog'",  # no caption: --prompt
    ]
    assert "steps: 3 images × 2 repeats / batch 3 = 2 batches per epoch; 4 steps × 1 accumulation = 2.0 epochs" in log
    assert r.steps == 4  # --epochs, not --steps 500
    md = load(r.path)[1]
    assert md["ss_steps"] == "4" and md["ss_num_train_images"] == "6"
    assert json.loads(md["ss_tag_frequency"]) == {"pets": {"sks dog": 3, "red ball": 2, "grass": 1}}


# ---------------------------------------------------------------- class images

@pytest.mark.slow
def test_class_images_are_generated_once_and_topped_up(tmp_path):
    images = make_images(tmp_path / "inst", 1, (64, 64))
    classes = tmp_path / "class dogs"  # does not exist yet
    log: list[str] = []
    train_tiny(tmp_path / "a.safetensors", images, log=log.append, steps=1, class_prompt="a dog",
        class_images=str(classes), num_class_images=2)
    first = sorted(classes.glob("*.png"))
    assert len(first) == 2 and any(l.startswith(f"generating 2 class images for 'a dog' into {classes}") for l in log)
    before = {p.name: p.read_bytes() for p in first}
    pixels = [np.asarray(Image.open(p)) for p in first]
    assert all(a.shape == (64, 64, 3) and a.std() > 1 for a in pixels) and not np.array_equal(*pixels)

    log.clear()
    r = train_tiny(tmp_path / "b.safetensors", images, log=log.append, steps=1, class_prompt="a dog",
            class_images=str(classes), num_class_images=3)
    assert any("generating 1 class images" in l and "(2 already there)" in l for l in log)
    now = sorted(classes.glob("*.png"))
    assert len(now) == 3 and {p.name: p.read_bytes() for p in now if p.name in before} == before
    assert load(r.path)[1]["ss_num_reg_images"] == "3"


def test_ensure_class_images_generates_the_missing_ones_and_keeps_the_rest(tmp_path):
    """train/prior.py on its own (the run above goes through it in a whole training): the folder is topped up to
    the count with the base's images at consecutive seeds, never rewriting those already there."""
    from sdlora.train.prior import ensure_class_images, slug

    base, log = load_base("tiny"), []
    folder = tmp_path / "class"
    first = ensure_class_images(base, "a dog", folder, 2, 32, seed=5, steps=2, log=log.append)
    assert [p.name for p in first] == ["00000-a-dog.png", "00001-a-dog.png"] and len(log) == 1
    before = {p.name: p.read_bytes() for p in first}
    log.clear()
    assert ensure_class_images(base, "a dog", folder, 2, 32, seed=5, steps=2, log=log.append) == first and not log
    now = ensure_class_images(base, "a dog", folder, 3, 32, seed=5, steps=2, log=log.append)
    assert log == [f"generating 1 class images for 'a dog' into {folder} (2 already there)"]
    assert len(now) == 3 and {p.name: p.read_bytes() for p in now if p.name in before} == before
    assert np.asarray(Image.open(now[2])).shape == (32, 32, 3) and slug("A photo, of: dogs!") == "a-photo-of-dogs"


# ---------------------------------------------------------------- min-SNR, noise offset, text-encoder LR

def test_min_snr_weights_match_the_reference_formula():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = load_base("tiny").noise_scheduler
    eps = DiffusionObjective(sched)
    v = DiffusionObjective(DDPMScheduler.from_config(sched.config, prediction_type="v_prediction"))
    t = torch.arange(0, 1000, 7)
    snr = compute_snr(sched, t)  # diffusers' own SNR, as its DreamBooth/LoRA scripts weight by it
    for gamma in (1.0, 5.0, 20.0):
        clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        torch.testing.assert_close(eps.min_snr_weights(t, gamma), clipped / snr, rtol=1e-5, atol=0)
        torch.testing.assert_close(v.min_snr_weights(t, gamma), clipped / (snr + 1), rtol=1e-5, atol=0)
    w = eps.min_snr_weights(t, 5.0)
    assert (w[snr <= 5] == 1).all() and (w[snr > 5] < 1).all() and w[0] < 0.01  # nearly clean steps count little


def test_batch_loss_is_instance_mean_plus_weighted_class_mean_in_one_forward_or_two():
    class Zero(torch.nn.Module):  # predicts 0: the per-sample ε loss is the mean squared noise
        def forward(self, x, t, cond, added_cond_kwargs=None):
            return SimpleNamespace(sample=torch.zeros_like(x))

    objective = DiffusionObjective(load_base("tiny").noise_scheduler)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, cond = torch.tensor([10, 500, 990]), torch.zeros(3, 1, 1)
    per = noise.pow(2).mean(dim=(1, 2, 3))
    together = [Batch(latents, cond, None, noise, t, n_instance=2)]
    apart = [Batch(latents[:2], cond[:2], None, noise[:2], t[:2], n_instance=2),
             Batch(latents[2:], cond[2:], None, noise[2:], t[2:], n_instance=0)]
    for batches in (together, apart):
        torch.testing.assert_close(batch_loss(Zero(), objective, batches, prior_weight=0.5),
                                   per[:2].mean() + 0.5 * per[2])
        w = objective.min_snr_weights(t, 5.0)
        torch.testing.assert_close(batch_loss(Zero(), objective, batches, prior_weight=0.5, min_snr_gamma=5.0),
                                   (per * w)[:2].mean() + 0.5 * (per * w)[2])
    assert batch_loss(Zero(), objective, [Batch(latents, cond, None, noise, t, n_instance=3)]) == per.mean()
    with pytest.raises(ValueError, match="consistency"):  # an objective nobody implements is refused by name
        objective_for(SimpleNamespace(objective="consistency"), objective.scheduler)


def test_latents_are_shifted_then_scaled_when_the_vae_has_a_shift():
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(scale_latents(SimpleNamespace(scaling_factor=0.18215), x), x * 0.18215, rtol=0, atol=0)
    torch.testing.assert_close(scale_latents(SimpleNamespace(scaling_factor=0.5, shift_factor=None), x), x * 0.5,
                               rtol=0, atol=0)
    torch.testing.assert_close(scale_latents(SimpleNamespace(scaling_factor=1.5, shift_factor=0.1), x),
                               (x - 0.1) * 1.5, rtol=0, atol=0)


def test_noise_offset_adds_a_per_channel_constant_of_that_scale():
    latents = torch.zeros(512, 4, 4, 4)
    objective = DiffusionObjective(load_base("tiny").noise_scheduler)
    plain, _ = sample_noise(latents, objective, torch.Generator().manual_seed(3), 0.0)
    offset, t = sample_noise(latents, objective, torch.Generator().manual_seed(3), 0.1)
    d = offset - plain
    assert d.std(dim=(2, 3)).max() < 1e-6  # constant over each channel's pixels
    assert abs(d[:, :, 0, 0].std().item() - 0.1) < 0.01  # N(0, 0.1²) per (sample, channel)
    assert abs(plain.std().item() - 1) < 0.02 and t.min() >= 0 and t.max() < 1000


@pytest.mark.slow
def test_min_snr_noise_offset_and_text_encoder_lr_train(tmp_path):
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    r = train_tiny(tmp_path / "o.safetensors", images, steps=2, save_every=1, lr=1e-3, te_lr=3e-4, min_snr_gamma=5,
            noise_offset=0.1)
    ck = ckpt.checkpoint_root(r.path) / "step-000001"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert [g["lr"] for g in manifest["optimizer_param_groups"]] == [1e-3, 3e-4]  # UNet, text encoder
    assert manifest["identity"]["min_snr_gamma"] == 5 and manifest["identity"]["noise_offset"] == 0.1
    # after one AdamW step from B = 0 every lora_up entry is -lr·g/(|g|+eps): its largest magnitude is the LR
    state = load(ck / "adapter.safetensors")[0]
    for prefix, lr in (("lora_unet_", 1e-3), ("lora_te_", 3e-4)):
        top = max(t.abs().max().item() for k, t in state.items() if k.startswith(prefix) and "lora_up" in k)
        assert top == pytest.approx(lr, rel=1e-3), prefix
    final, md = load(r.path)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert float(md["ss_min_snr_gamma"]) == 5 and md["ss_noise_offset"] == "0.1"
    assert md["ss_unet_lr"] == "0.001" and md["ss_text_encoder_lr"] == "0.0003"


# ---------------------------------------------------------------- monitor

@pytest.mark.slow
def test_sample_grids_loss_curve_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = make_images(tmp_path / "imgs", 2, (64, 64))
    classes = make_images(tmp_path / "cls", 1, (64, 64), seed=4)
    out = tmp_path / "run" / "mon.safetensors"
    r = train_tiny(out, images, steps=2, sample_every=1, sample_steps=2, class_prompt="a dog",
                   class_images=str(classes), num_class_images=1, tensorboard=True)
    grids = sorted((tmp_path / "run" / "mon-samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"] and r.samples == grids
    cell, label = 96, 14  # 64 px samples shown at 96 px, a label line above each row
    for g in grids:
        im = np.asarray(Image.open(g).convert("RGB")).astype(int)
        assert im.shape == (label + 3 * (cell + label), 2 * cell, 3)  # rows: trigger, class, unrelated; 2 seeds
        cells = [im[label + r_ * (cell + label) + label:][:cell, c * cell:(c + 1) * cell]
                 for r_ in range(3) for c in range(2)]
        assert all(x.std() > 1 for x in cells)  # an image, not the white background
        assert all(not np.array_equal(cells[i], cells[j]) for i in range(6) for j in range(i + 1, 6))
    assert r.loss_curve == tmp_path / "run" / "mon-loss.png" and Image.open(r.loss_curve).size == (640, 320)

    logs = tmp_path / "run" / "mon-logs"
    assert list(logs.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(logs))
    ea.Reload()
    assert {"loss", "lr"} <= set(ea.Tags()["scalars"]) and "samples" in ea.Tags()["images"]
    loss = ea.Scalars("loss")
    assert [e.step for e in loss] == [1, 2] and all(0 < e.value < 10 and math.isfinite(e.value) for e in loss)
    assert [(e.step, e.value) for e in ea.Scalars("lr")] == [(1, pytest.approx(1e-3)), (2, pytest.approx(1e-3))]
    shots = ea.Images("samples")
    assert [e.step for e in shots] == [1, 2] and (shots[0].width, shots[0].height) == (2 * cell, im.shape[0])


# ---------------------------------------------------------------- several processes

# `accelerate launch --cpu --num_processes 2` starts ONE process (its CPU launcher needs mpirun); two CPU processes
# over gloo are torchrun's (--multi_gpu) with ACCELERATE_USE_CPU set.
#
# Text-encoder training under DDP with buckets and prior preservation: a rank whose instance batch has the class
# images' size runs one forward, another rank runs two (instance and class groups apart). With DDP's per-forward
# buffer broadcast (CLIP's position_ids) the ranks' collectives no longer paired up and both processes waited
# forever; the trainer turns that broadcast off (the buffers are frozen). The two class images given are all there
# are (--num-class-images 2): the default 100 would have the tiny model draw 98 more and both processes encode
# them, 7x the CPU of the run, for nothing this checks. (With the broadcast turned back on, this run fails at step 2.)
# One run checks both that and the plain two-process facts (each launch pays two processes' imports, ~12 s of CPU).
@pytest.mark.slow
@pytest.mark.subprocess
def test_two_process_gloo_run_with_buckets_prior_and_text_encoder_writes_a_valid_adapter(tmp_path, cache_dir):
    images = mixed_aspect_images(tmp_path / "inst")
    classes = make_images(tmp_path / "cls", 2, (64, 64), seed=9)
    out, log = tmp_path / "bp.safetensors", tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([*ACCELERATE_2CPU, "-m", "sdlora", "train", "--model", "tiny", "--images", str(images),
                                 "--prompt", "sks dog", "--steps", "3", "--buckets", "--class-prompt", "a dog",
                                 "--class-images", str(classes), "--num-class-images", "2", "--out", str(out)],
                                cwd=ROOT, env=sub_env(cache_dir) | {"ACCELERATE_USE_CPU": "1"}, stdout=f,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=300)  # the run itself takes ~20 s of CPU
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun's agent stops its workers (they run in sessions of their own) on SIGTERM
            proc.wait(timeout=60)
            pytest.fail("the 2-process run hung (not done in 300 s)")
    output = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, output[-3000:]
    # the epoch is counted per process: 3 images over 2 processes, 2 batches each
    assert "3 images × 1 repeats / batch 1 / 2 processes = 2 batches per epoch" in output, output[-3000:]
    assert output.count(f"saved {out}") == 1  # the main process alone writes
    state, md = load(out)
    assert len(state) == 3 * 80 and md["ss_steps"] == "3"
    assert all(torch.isfinite(t).all() for t in state.values())
    assert sum(t.abs().sum() for k, t in state.items() if "lora_up" in k) > 0


# ---------------------------------------------------------------- presets

REQUIRED_PRESETS = {"quickstart-tiny", "subject-sd15-8gb", "subject-sd15-16gb", "style-sd15-8gb", "subject-sdxl-12gb"}


def test_the_documented_presets_exist():
    names = {p.stem for p in CONFIGS.glob("*.toml")}
    assert REQUIRED_PRESETS <= names
    table = (CONFIGS / "README.md").read_text(encoding="utf-8")
    assert all(f"{n}.toml" in table for n in names)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_loads_validates_and_explains_itself(path):
    text = path.read_text(encoding="utf-8")
    header = [l for l in text.splitlines()[:40] if l.startswith("#")]
    assert len(header) >= 5 and ("VRAM" in text or "offline" in text)  # a comment header: purpose, why, tier
    values = load_toml(path)
    assert not {"images", "prompt", "out", "resume"} & values.keys()  # per-run things come from the command line
    cfg = make_config(values | {"images": "x", "prompt": "sks dog"})
    for k, v in values.items():
        assert getattr(cfg, k) == v


@pytest.mark.slow
def test_quickstart_tiny_preset_trains_from_the_command_line(tmp_path, cache_dir, capsys):
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    out = tmp_path / "q.safetensors"
    p = run_main(capsys, "train", "--config", CONFIGS / "quickstart-tiny.toml", "--images", images,
                 "--prompt", "sks dog", "--steps", "2", "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    state, md = load(out)
    preset = load_toml(CONFIGS / "quickstart-tiny.toml")
    assert md["ss_steps"] == "2" and md["ss_sd_model_name"] == "tiny"  # the flag overrides the file's steps
    assert md["ss_network_dim"] == str(preset["rank"])


@pytest.mark.parametrize("values,needle", [
    ({"rank": "8"}, "--rank must be a whole number, got '8'"),
    ({"steps": 2.5}, "--steps must be a whole number, got 2.5"),
    ({"buckets": "false"}, "--buckets must be true or false, got 'false'"),  # a truthy string must not turn it on
    ({"lr": "1e-4"}, "--lr must be a number, got '1e-4'"),
    ({"rank": True}, "--rank must be a whole number, got True"),
    ({"rank": 0}, "--rank must be at least 1, got 0"),
])
def test_preset_values_of_the_wrong_type_are_refused_naming_the_option(tmp_path, values, needle):
    f = tmp_path / "bad.toml"
    f.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()), encoding="utf-8")
    with pytest.raises(SdloraError, match=re.escape(needle)):
        make_config(load_toml(f) | {"images": "x", "prompt": "sks dog"})


def test_whole_numbers_for_float_options_become_floats():
    cfg = make_config({"images": "x", "prompt": "p", "min_snr_gamma": 5, "alpha": 2, "te_lr": None})
    assert (cfg.min_snr_gamma, cfg.alpha, cfg.te_lr) == (5.0, 2.0, None) and type(cfg.alpha) is float
