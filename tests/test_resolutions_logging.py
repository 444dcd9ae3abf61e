"""Several resolutions in one run (issue 20, part 8) and --log-with tensorboard|wandb|all (part 9)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import main_error, make_images, train_tiny, wandb_history
from safetensors import safe_open

from sdlora.cache import LatentCache
from sdlora.config import make_config
from sdlora.data.examples import Example
from sdlora.errors import SdloraError


def _cfg(**kw):
    return make_config(dict(images="x", prompt="p") | kw)


def test_resolution_takes_one_size_or_several():
    assert _cfg(resolution="768,512,1024").resolution == "512,768,1024"
    c = _cfg(resolution="512, 768")
    assert c.resolutions == (512, 768) and c.max_resolution == 768
    one = _cfg(resolution="512")
    assert one.resolution == 512 and one.resolutions == (512,)
    assert _cfg(resolution=640).resolutions == (640,)  # a TOML number
    assert _cfg().resolutions is None and _cfg().max_resolution is None


@pytest.mark.parametrize("value,says", [
    ("512,abc", "--resolution must be a size in pixels or sizes separated by commas"),
    ("512,512", "--resolution lists a size twice"),
    ("512,700", "--resolution must be a positive multiple of 8, got 700"),
    ("512,8192", "--resolution must be at most 4096, got 8192"),
    ("", "--resolution must be a size in pixels"),
])
def test_bad_resolution_lists_are_refused_in_one_line(capsys, value, says):
    assert says in main_error(capsys, "train", "--images", "x", "--prompt", "p", "--resolution", value)


def _latent_files(cache: Path) -> dict[str, tuple]:
    out = {}
    for p in (cache / "latents").rglob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            out[p.stem] = tuple(f.get_slice("mean").get_shape())
    return out


@pytest.mark.slow
def test_every_image_trains_at_every_listed_size_with_latents_cached_per_size(tmp_path):
    images = make_images(tmp_path / "imgs", 2, (64, 64))
    cache = tmp_path / "cache"
    # 2 images × 2 sizes = 4 examples, batch 1: one epoch of 4 steps sees each once
    r = train_tiny(tmp_path / "o.safetensors", images, steps=4, resolution="32,64", no_flip=True, cache_dir=str(cache),
                   no_eval_loss=True)
    files = _latent_files(cache)
    vae = r.base.vae
    lc = LatentCache(vae, None)
    want = {lc.key(Example(p, "", (s, s)), False): (lc.channels, s // lc.factor, s // lc.factor)
            for p in sorted(images.iterdir()) for s in (32, 64)}
    assert files == want
    with safe_open(str(r.path), "pt") as f:
        md = f.metadata()
    assert md["ss_resolution"] == "(64, 64)" and json.loads(md["sdlora_config"])["resolution"] == "32,64"


@pytest.mark.slow
def test_buckets_are_made_per_size(tmp_path):
    images = make_images(tmp_path / "imgs", 2, (80, 64))  # 5:4
    cache = tmp_path / "cache"
    train_tiny(tmp_path / "o.safetensors", images, steps=4, resolution="32,64", buckets=True, no_flip=True,
               cache_dir=str(cache), no_eval_loss=True)
    shapes = sorted(set(_latent_files(cache).values()))
    assert len(shapes) == 2 and len(_latent_files(cache)) == 4  # each image once per size
    for (_, h, w), size in zip(shapes, (32, 64)):
        assert w >= h and abs(w * h / (size / 8) ** 2 - 1) < 0.3  # about size² pixels (latents 1/8 a side)
    assert shapes[1][2] > shapes[1][1]  # at 64 px the 5:4 images get a wide bucket


# ---- logging


def test_tensorboard_is_log_with_tensorboard_and_all_is_both():
    assert _cfg(tensorboard=True).log_with == "tensorboard"
    assert _cfg(log_with="tensorboard").tensorboard
    assert _cfg().log_with is None and not _cfg().tensorboard
    if importlib.util.find_spec("wandb") is None:  # "all" includes wandb: without it, refused at the config
        with pytest.raises(SdloraError, match="pip install wandb"):
            _cfg(log_with="all")
    else:
        assert _cfg(log_with="all").tensorboard and _cfg(log_with="all").log_with == "all"


def test_wandb_missing_is_one_line_naming_the_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    err = main_error(capsys, "train", "--images", "x", "--prompt", "p", "--log-with", "wandb")
    assert err.startswith("sdlora: error: --log-with wandb needs Weights & Biases: pip install wandb")
    with pytest.raises(SdloraError, match="pip install wandb"):
        _cfg(tensorboard=True, log_with="wandb")  # --tensorboard on top: all


@pytest.mark.slow
def test_tensorboard_gets_a_histogram_of_the_sampled_sigma(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = make_images(tmp_path / "imgs", 4, (64, 64))
    r = train_tiny(tmp_path / "f.safetensors", images, model="tiny-sd3", steps=3, batch_size=2, no_eval_loss=True,
                   no_text_encoder=True, log_with="tensorboard", timestep_sampling="uniform")
    logs = r.path.with_name("f-logs")
    acc = EventAccumulator(str(logs), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "sigma" in acc.Tags()["histograms"] and "loss" in acc.Tags()["scalars"]
    hists = acc.Histograms("sigma")
    assert sum(h.histogram_value.num for h in hists) == 3 * 2  # every σ drawn, once
    assert all(0 <= h.histogram_value.min and h.histogram_value.max < 1 for h in hists)


@pytest.mark.slow
def test_wandb_offline_run_logs_loss_and_timesteps(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = train_tiny(tmp_path / "w.safetensors", steps=2, no_eval_loss=True, log_with="all")
    logs = r.path.with_name("w-logs")
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = wandb_history(runs[0])
    assert [r["_step"] for r in rows] == [1, 2]
    tb = _scalars(logs, "loss")  # TensorBoard beside it has the same losses
    assert [r["loss"] for r in rows] == pytest.approx([tb[1], tb[2]], rel=1e-6)
    assert all(r["timestep/_type"] == "histogram" and sum(r["timestep/values"]) == 1 for r in rows)
    assert 0 <= rows[0]["timestep/bins"][0] < 1000


def _scalars(logs: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}



def test_tensorboard_tracker_writes_what_each_call_gives(tmp_path):
    """train/logs.Trackers with TensorBoard alone: scalars, an image and a histogram land in the event files as
    given (read back with TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdlora.train.logs import Trackers

    t = Trackers("tensorboard", tmp_path / "logs", "run")
    assert t.wandb is None
    for step, loss in enumerate((0.5, 0.25, 0.125)):
        t.add_scalar("loss", loss, step)
    t.add_image("samples", np.zeros((8, 12, 3), dtype=np.uint8), 2)
    t.add_histogram("sigma", np.array([0.1, 0.2, 0.9]), 2)
    t.close()
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    (im,) = acc.Images("samples")
    assert (im.step, im.width, im.height) == (2, 12, 8)
    (h,) = acc.Histograms("sigma")
    assert h.histogram_value.num == 3 and h.histogram_value.min == pytest.approx(0.1)
