"""The training controls of issue 20 on the tiny model: --init-lora (continue from an adapter), --masks/--alpha-mask
(masked loss), validation (--validation-split, --validate-every, the -best file) and --ema (the -ema file), each by
its observable effect: the weights it loads, the bits a white mask leaves alone, the checkpoint the best file is, the
average a hand computation gives, a resume that continues bit for bit."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import DOG, assert_same_tensors, main_error, make_images, randomize_trainable, run_main, train_tiny


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _dog_masks(folder: Path, value=255, black: str | None = None) -> Path:
    """A mask per dog image (same stem), all `value`; the image `black` (a stem) all black."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(DOG.glob("*.jpg")) + sorted(DOG.glob("*.png")) + sorted(DOG.glob("*.jpeg")):
        with Image.open(p) as im:
            size = im.size
        Image.new("L", size, 0 if p.stem == black else value).save(folder / f"{p.stem}.png")
    return folder


# ---------------------------------------------------------------- options: one-line refusals before anything loads


@pytest.mark.parametrize("flags, words", [
    (["--ema", "1.5"], "--ema must be a decay in (0, 1)"),
    (["--ema-update-every", "3"], "--ema-update-every needs --ema"),
    (["--validation-split", "1"], "--validation-split must be in [0, 1)"),
    (["--validate-every", "5"], "--validate-every needs a validation set"),
    (["--validation-split", "0.2", "--validation-images", "x"], "contradicts --validation-images"),
    (["--masks", "m", "--alpha-mask"], "--alpha-mask contradicts --masks"),
    (["--masks", "/nonexistent/masks"], "--masks /nonexistent/masks: no such folder"),
    (["--init-lora", "/nonexistent.safetensors"], "--init-lora /nonexistent.safetensors: no such file"),
])
def test_control_options_refused_in_one_line(capsys, tmp_path, flags, words):
    images = make_images(tmp_path / "img", n=2, size=(32, 32))
    line = main_error(capsys, "train", "--images", images, "--prompt", "sks dog", "--model", "tiny", "--out",
                      tmp_path / "a.safetensors", *flags)
    assert words in line


# ---------------------------------------------------------------- --init-lora


@pytest.mark.slow
def test_init_lora_continues_from_the_file(tmp_path, trained):
    """A ~zero learning rate returns the source's weights (same rank and alpha: the same tensors); with another
    alpha the scale is folded in, so every module's ΔW is the source's; a PEFT folder of it loads the same; the
    lineage (name, sha256) is in the metadata."""
    from sdlora.formats.convert import convert
    from sdlora.formats.read import read_adapter

    src = trained.path
    out = train_tiny(tmp_path / "same.safetensors", steps=1, lr=1e-12, rank=4, alpha=2, init_lora=str(src)).path
    a, b = load_file(src), load_file(out)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-9, worst
    md = _meta(out)
    assert md["sdlora_init_lora"] == src.name
    assert md["sdlora_init_lora_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    peft = tmp_path / "as-peft"
    convert(src, peft, "peft")
    out2 = train_tiny(tmp_path / "alpha.safetensors", steps=1, lr=1e-12, rank=4, init_lora=str(peft)).path
    ra, rb = read_adapter(src), read_adapter(out2)
    assert ra.modules.keys() == rb.modules.keys()
    assert {m.alpha for m in rb.modules.values()} == {4.0}  # this run's alpha, not the file's 2
    worst = max(float((ra.modules[k].delta() - rb.modules[k].delta()).abs().max()) for k in ra.modules)
    assert worst < 1e-9, worst


def test_init_lora_refuses_another_family_kind_or_rank(capsys, tmp_path, trained):
    src = trained.path
    tensors = load_file(src)
    md = _meta(src) | {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    other = tmp_path / "sdxl.safetensors"
    save_file(tensors, other, md)
    common = ["train", "--images", DOG, "--prompt", "sks dog", "--model", "tiny", "--steps", "1",
              "--out", tmp_path / "o.safetensors", "--overwrite"]
    line = main_error(capsys, *common, "--rank", "4", "--alpha", "2", "--init-lora", other)
    assert "is an adapter for SDXL, this model is SD 1.x" in line
    line = main_error(capsys, *common, "--rank", "2", "--init-lora", src)
    assert "rank 4, this run trains lora at rank 2" in line
    line = main_error(capsys, *common, "--rank", "4", "--network", "loha", "--init-lora", src)
    assert "is a lora module, this run trains loha" in line
    line = main_error(capsys, *common, "--rank", "4", "--no-text-encoder", "--init-lora", src)
    assert "of its modules are not trained by this run" in line


# ---------------------------------------------------------------- masks


@pytest.mark.slow
def test_white_masks_train_bit_identically_to_no_masks(tmp_path, trained_adapter):
    plain = trained_adapter("dog", steps=3)
    masked = train_tiny(tmp_path / "masked.safetensors", steps=3, masks=str(_dog_masks(tmp_path / "m")),
                        cache_dir=str(tmp_path / "cache"))
    assert_same_tensors(load_file(plain.path), load_file(masked.path))
    assert _meta(masked.path)["ss_masked_loss"] == "True"
    assert _meta(plain.path)["ss_masked_loss"] == "False"


@pytest.mark.slow
def test_a_mask_that_hides_half_of_each_image_changes_what_is_learnt(tmp_path, trained_adapter):
    """The other side of the all-white test: masks reach the loss. Left halves black, right halves white: the
    adapter differs from the unmasked one (a uniform grey would not show it: Adam undoes a constant scale)."""
    folder = _dog_masks(tmp_path / "m")
    for p in folder.iterdir():
        with Image.open(p) as im:
            w, h = im.size
        half = Image.new("L", (w, h), 255)
        half.paste(0, (0, 0, w // 2, h))
        half.save(p)
    plain = load_file(trained_adapter("dog", steps=3).path)
    masked = load_file(train_tiny(tmp_path / "half.safetensors", steps=3, masks=str(folder),
                                  cache_dir=str(tmp_path / "cache")).path)
    assert plain.keys() == masked.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert ups and not any(torch.equal(plain[k], masked[k]) for k in ups)


def test_black_mask_refused_in_one_line(capsys, tmp_path):
    first = sorted(p.stem for p in DOG.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
    masks = _dog_masks(tmp_path / "m", black=first)
    line = main_error(capsys, "train", "--images", DOG, "--prompt", "sks dog", "--model", "tiny", "--steps", "1",
                      "--out", tmp_path / "o.safetensors", "--masks", masks)
    assert f"{first}.png covers nothing" in line and "would train nothing" in line


def test_missing_mask_refused_before_the_model_loads(capsys, tmp_path):
    masks = _dog_masks(tmp_path / "m")
    gone = sorted(masks.iterdir())[0]
    gone.unlink()
    line = main_error(capsys, "train", "--images", DOG, "--prompt", "sks dog", "--model", "tiny",
                      "--out", tmp_path / "o.safetensors", "--masks", masks)
    assert f"no mask for {gone.stem}" in line


def _picture(tmp_path: Path) -> tuple[Path, Path]:
    """A 96x64 picture: a red block on blue at columns 10-29, rows 20-49, and its mask (white on that block)."""
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[..., 2] = 255
    arr[20:50, 10:30] = (255, 0, 0)
    img = tmp_path / "pic.png"
    Image.fromarray(arr).save(img)
    m = np.zeros((64, 96), np.uint8)
    m[20:50, 10:30] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(m, "L").save(tmp_path / "masks" / "pic.png")
    return img, tmp_path / "masks" / "pic.png"


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (48, 64)])
def test_mask_is_cropped_as_its_image(tmp_path, size):
    """At a square size and at other buckets (cover-resize and centre-crop), the mask's white pixels are the
    image's red ones (up to the resampling's blurred edge)."""
    from sdlora.data.images import load_image
    from sdlora.data.masks import load_mask

    img, mask = _picture(tmp_path)
    pixels = load_image(img, size)  # [3, H, W] in [-1, 1]
    m = load_mask(mask, img, size)
    assert tuple(m.shape) == (size[1], size[0])
    red = (pixels[0] > 0) & (pixels[2] < 0)
    sure = (m > 0.9) | (m < 0.1)
    assert int(sure.sum()) > 0.8 * m.numel()
    assert torch.equal(red[sure], (m > 0.5)[sure])


def test_mask_follows_flips_and_enters_the_cache_key(tmp_path):
    """The cached mask of a flipped latent is the flipped one; it is the area average of the pixel mask on the
    latent grid; a mask changes the cache key, and so does another mask."""
    from sdlora.cache import LatentCache
    from sdlora.data.examples import Example
    from sdlora.data.masks import load_mask
    from sdlora.models import load_base

    img, mask = _picture(tmp_path)
    vae = load_base("tiny").vae
    cache = LatentCache(vae, None)
    ex = Example(img, "x", (64, 64), mask=mask)
    plain = Example(img, "x", (64, 64))
    m0, m1 = cache.mask(ex, False), cache.mask(ex, True)
    h, w = cache.shape(ex)[1:]
    pooled = torch.nn.functional.avg_pool2d(load_mask(mask, img, (64, 64))[None, None], 64 // h)[0]
    assert tuple(m0.shape) == (1, h, w) and torch.allclose(m0, pooled, atol=1e-6)
    assert torch.equal(m1, m0.flip(-1))
    assert torch.equal(cache.mask(plain, False), torch.ones(1, h, w))
    other = tmp_path / "masks" / "other.png"
    Image.new("L", (96, 64), 255).save(other)
    keys = {cache.key(plain, False), cache.key(ex, False), cache.key(Example(img, "x", (64, 64), mask=other), False)}
    assert len(keys) == 3


def test_scan_reports_mask_coverage(capsys, tmp_path):
    img, mask = _picture(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(img, data / "pic.png")
    r = run_main(capsys, "scan", data, "--prompt", "x", "--resolution", "64", "--masks", tmp_path / "masks")
    assert r.returncode == 0, r.stdout + r.stderr
    want = 100 * float(np.asarray(Image.open(mask).resize((96, 64))).astype(np.float64).mean() / 255)
    from sdlora.data.masks import coverage

    got = 100 * coverage(mask, data / "pic.png", (64, 64))
    line = next(ln for ln in r.stdout.splitlines() if "pic.png" in ln)
    assert f"mask {got:.1f}%" in line
    assert abs(got - want) < 15  # the crop cuts the picture's sides: near the whole picture's share, not equal


# ---------------------------------------------------------------- validation and EMA (one run, and its resume)


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
    """4 steps with --ema 0.8, a validation split and a checkpoint every step."""
    out = tmp_path_factory.mktemp("ema") / "e.safetensors"
    logs: list[str] = []
    result = train_tiny(out, log=lambda m: logs.append(str(m)), steps=4, ema=0.8, validation_split=0.2,
                        validate_every=2, save_every=1, keep_last=0)
    return result, "\n".join(logs)


def _ema_by_hand(weights: list[dict], decay: float) -> dict:
    """EMA of successive weights as diffusers' EMAModel defines it: the first update copies, the k-th (k >= 2)
    moves by (1 - d) with d = min(decay, k / (9 + k))."""
    avg = {k: v.clone() for k, v in weights[0].items()}
    for k, w in enumerate(weights[1:], start=2):
        d = min(decay, k / (9 + k))
        for n in avg:
            avg[n] = avg[n] - (1 - d) * (avg[n] - w[n])
    return avg


@pytest.mark.slow
def test_ema_file_is_the_average_of_the_checkpoints(ema_run):
    result, _ = ema_run
    out = result.path
    steps = [load_file(out.with_name("e-checkpoints") / f"step-{s:06d}" / "adapter.safetensors") for s in (1, 2, 3)]
    steps.append(load_file(out))
    want = _ema_by_hand([{k: v for k, v in s.items() if not k.endswith(".alpha")} for s in steps], 0.8)
    got = load_file(out.with_name("e-ema.safetensors"))
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-7, worst
    assert not torch.equal(got[next(iter(want))], steps[-1][next(iter(want))])  # an average, not the last step
    md = _meta(out.with_name("e-ema.safetensors"))
    assert md["sdlora_ema_decay"] == "0.8" and md["sdlora_ema_updates"] == "4"


@pytest.mark.slow
def test_validation_keeps_the_best_step(ema_run):
    """The validation loss is logged before the first step, at step 2 and at the end; the -best file is the adapter
    of the step with the lowest loss after the first (the checkpoint's own adapter, bit for bit), its step and
    loss in its metadata; one of the 5 dog images is held out of training (the folder still counts 5 in
    `ss_num_train_images`, as kohya counts folders; the captions trained on are 4)."""
    result, log = ema_run
    out = result.path
    losses = {int(s): float(v) for v, s in re.findall(r"validation loss ([\d.]+) at step (\d+)", log)}
    assert sorted(losses) == [0, 2, 4]
    best_step = min((s for s in losses if s), key=lambda s: losses[s])
    md = _meta(out.with_name("e-best.safetensors"))
    assert int(md["sdlora_best_step"]) == best_step
    assert abs(float(md["sdlora_best_validation_loss"]) - losses[best_step]) < 1e-4
    same = out if best_step == 4 else out.with_name("e-checkpoints") / f"step-{best_step:06d}" / "adapter.safetensors"
    assert_same_tensors(load_file(out.with_name("e-best.safetensors")), load_file(same))
    assert json.loads(_meta(out)["ss_tag_frequency"]) == {"dog": {"sks dog": 4}}  # 4 of 5 images trained on
    assert _meta(out)["ss_validation_split"] == "0.2"
    assert out.with_name("e-loss.png").is_file()


@pytest.mark.slow
def test_resume_continues_the_average_and_the_best_bit_exactly(ema_run, tmp_path):
    result, _ = ema_run
    out = result.path
    again = tmp_path / "e.safetensors"
    train_tiny(again, steps=4, ema=0.8, validation_split=0.2, validate_every=2, save_every=1, keep_last=0,
               resume=str(out.with_name("e-checkpoints") / "step-000002"))
    for suffix in ("", "-ema", "-best"):
        assert_same_tensors(load_file(out.with_name(f"e{suffix}.safetensors")),
                            load_file(again.with_name(f"e{suffix}.safetensors")))
    manifest = json.loads((out.with_name("e-checkpoints") / "step-000002" / "manifest.json").read_text())
    assert manifest["extra"]["ema_updates"] == 2


@pytest.fixture(scope="session")
def tiny_unet():
    from sdlora.models import load_base

    return load_base("tiny").components["unet"]


@pytest.mark.parametrize("kind, dora, factor", [("lora", False, -1), ("locon", False, -1), ("loha", False, -1),
                                                ("lokr", False, -1), ("lokr", False, 2), ("lora", True, -1)])
def test_each_kind_loads_what_it_collects_at_another_alpha(tiny_unet, kind, dora, factor):
    """`KindSpec.load` (what --init-lora sets layers with) inverts `collect`: a UNet whose layers (alpha 4) are
    loaded from another's (alpha 2, random values) computes the same output."""
    import copy

    from sdlora.lora import kinds
    from sdlora.lora.inject import Network, add_lora
    from sdlora.lora.targets import find_targets

    unet = tiny_unet
    net = Network(kind, dora=dora, factor=factor)
    a, b = copy.deepcopy(unet), copy.deepcopy(unet)
    add_lora(a, find_targets(a, "unet", "default"), 4, 2.0, net)
    add_lora(b, find_targets(b, "unet", "default"), 4, 4.0, net)
    g = randomize_trainable(a)
    with torch.no_grad():
        la, lb = kinds.adapter_layers(a), kinds.adapter_layers(b)
        for name, (spec, layer) in la.items():
            k, t, alpha = spec.collect(layer)
            _, mine, alpha_b = lb[name][0].collect(lb[name][1])
            lb[name][0].load(lb[name][1], t, spec.scale(alpha, t) / spec.scale(alpha_b, mine))
    c = unet.config
    x = torch.randn(1, c.in_channels, 16, 16, generator=g)
    h = torch.randn(1, 5, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        ya, yb, y0 = (m(x, 10, h).sample for m in (a, b, unet))
    assert float((ya - y0).abs().max()) > 1e-3  # the layers do something
    assert torch.allclose(ya, yb, atol=1e-5, rtol=0), float((ya - yb).abs().max())


def test_toy_busy_dataset_is_reproducible_and_its_backgrounds_count_as_leak(tmp_path):
    """benchmarks/toy_controls.py renders the shipped data set byte for byte; its background-leak measure reads the
    toy world's own plain renders as no leak and every striped training image as leak."""
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("toy_controls", ROOT / "benchmarks" / "toy_controls.py")
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    made = tc.make_dataset(tmp_path / "busy")
    shipped = ROOT / "datasets" / "toy-triangle-busy"
    files = sorted(p.relative_to(made) for p in made.rglob("*.png"))
    assert len(files) == 8 + 8 + 3
    assert all((made / f).read_bytes() == (shipped / f).read_bytes() for f in files)
    from sdlora.toy import world

    plain = [world.render(world.sample_scene(s)) for s in range(20)]
    busy = [np.asarray(Image.open(shipped / f"{i:02d}.png").convert("RGB")) for i in range(8)]
    assert tc.background_leak(plain) == 0.0
    assert tc.background_leak(busy) == 1.0


def test_alpha_mask_is_the_images_alpha_channel(tmp_path):
    """--alpha-mask: the alpha channel, cropped as the image; an image without alpha learns everywhere."""
    from sdlora.data.masks import ALPHA, load_mask

    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[20:50, 10:30, 3] = 255
    img = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(img)
    _, mask = _picture(tmp_path)
    assert torch.equal(load_mask(ALPHA, img, (64, 64)), load_mask(mask, img, (64, 64)))
    rgb = tmp_path / "b.png"
    Image.fromarray(rgba[..., :3]).save(rgb)
    assert torch.equal(load_mask(ALPHA, rgb, (48, 64)), torch.ones(64, 48))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_init_lora_on_the_fused_qkv_families(tmp_path, model):
    """SD 3.x / FLUX.1 files fuse q/k/v into one module (kohya's names): --init-lora splits them back onto the
    trained layers, and a ~zero learning rate gives every module the source's ΔW back."""
    from sdlora.formats.read import read_adapter

    src = train_tiny(tmp_path / "src.safetensors", model=model, steps=2, lr=1e-2).path
    out = train_tiny(tmp_path / "out.safetensors", model=model, steps=1, lr=1e-12, init_lora=str(src)).path
    ra, rb = read_adapter(src), read_adapter(out)
    assert ra.modules.keys() == rb.modules.keys()
    worst = max(float((ra.modules[k].delta() - rb.modules[k].delta()).abs().max()) for k in ra.modules)
    assert worst < 1e-9, worst
