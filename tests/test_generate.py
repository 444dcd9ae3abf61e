"""Generation with blended adapters on the built-in tiny model: real trained files, exact image equality."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora import cli
from sdlora.errors import SdloraError
from sdlora.formats import file_io, kohya, layouts
from sdlora.formats.a1111 import ImageParams, LoraRef, format_parameters, parse_parameters, read_parameters
from sdlora.formats.kohya import save as save_adapter
from sdlora.infer.cli import parse_lora_spec
from sdlora.infer.session import Session, Settings
from sdlora.lora.kinds.lora import lora_delta
from sdlora.models import load_base
from tests import reference
from tests.helpers import run_main

pytestmark = pytest.mark.xdist_group("generate-adapters")  # one worker trains the shared `dog` adapter once
SETTINGS = dict(prompt="sks dog on a beach", negative="blurry, text", seed=7, steps=4, guidance=6.5)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, trained_adapter) -> dict[str, Path]:
    """`dog`: trained by sdlora (default preset: UNet attn2 q/v, TE attention); `locon`: a kohya LoCon file with a
    3x3 conv, a 1x1 conv, Linear modules in both components, alpha != r, one module without alpha, fp16 tensors."""
    dog = trained_adapter("dog", steps=6, lr=1e-2, seed=1).path
    d = tmp_path_factory.mktemp("adapters")
    g = torch.Generator().manual_seed(3)
    t = {}
    comps = load_base("tiny").components
    for comp, name, k, r, alpha in [
        ("unet", "down_blocks.0.resnets.0.conv1", 3, 4, 2.0),
        ("unet", "down_blocks.2.attentions.0.proj_in", 1, 8, 4.0),
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", None, 4, None),
        ("te", "encoder.layers.3.mlp.fc1", None, 2, 1.0),
    ]:
        out_, in_ = comps[comp].get_submodule(name).weight.shape[:2]  # the tiny model's own widths
        down = torch.randn(r, in_, *((k, k) if k else ()), generator=g) * 0.3
        up = torch.randn(out_, r, *((1, 1) if k else ()), generator=g) * 0.3
        kn = kohya.kohya_name(comp, name)
        t[f"{kn}.lora_down.weight"], t[f"{kn}.lora_up.weight"] = down.half(), up.half()
        if alpha is not None:
            t[f"{kn}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_adapter(t, d / "locon.safetensors", {"ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "zzt"})
    return {"dog": dog, "locon": d / "locon.safetensors"}


def merged_base(blend: list[tuple[Path, float, float]]):
    """Reference: a fresh tiny model with W += s·(alpha/r)·up@down added per file, in order (text encoder, unet)."""
    base = load_base("tiny")
    table = layouts.table_of(base.components, base.arch)
    with torch.no_grad():
        for path, te, unet in blend:
            tensors, _ = file_io.load(path)
            for mod, parts in reference.group(tensors).items():
                where = table[mod]
                w = base.components[where.component].get_submodule(where.module_path).weight
                w += ((unet if where.component == "unet" else te) * reference.lora_delta(
                    parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"))).to(w.dtype)
    return base


def image(session: Session, strengths=None, **kw) -> np.ndarray:
    [(img, _)] = session.generate(Settings(**(SETTINGS | kw)), strengths or {})
    return np.asarray(img)


def rounding_only(a: np.ndarray, b: np.ndarray) -> bool:
    """Two uint8 images equal but for float rounding: no value off by more than 1, at most 0.1% of values off."""
    d = np.abs(a.astype(int) - b.astype(int))
    return d.max() <= 1 and (d > 0).sum() <= a.size // 1000


def weights(base) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in base.components.items() for k, v in m.state_dict().items()}


def assert_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= tol, worst


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_delta_is_the_lora_forward(kind):
    """W + delta computes base(x) + (alpha/r)·up(down(x)): the merge kohya does, including 3x3 LoCon convs."""
    g = torch.Generator().manual_seed(0)
    r, alpha = 3, 1.5
    if kind == "linear":
        base, down, up = torch.nn.Linear(10, 6), torch.nn.Linear(10, r, bias=False), torch.nn.Linear(r, 6, bias=False)
        x = torch.randn(5, 10, generator=g)
    else:
        k = 3 if kind == "conv3x3" else 1
        base = torch.nn.Conv2d(10, 6, k, stride=2, padding=k // 2)
        down = torch.nn.Conv2d(10, r, k, stride=2, padding=k // 2, bias=False)
        up = torch.nn.Conv2d(r, 6, 1, bias=False)
        x = torch.randn(2, 10, 9, 9, generator=g)
    with torch.no_grad():
        want = base(x) + alpha / r * up(down(x))
        base.weight += lora_delta(down.weight, up.weight, alpha)
        torch.testing.assert_close(base(x), want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero_strengths_give_exactly_the_base_image(adapters):
    plain = Session("tiny")
    w0 = weights(plain.base)
    base_img = image(plain)
    s = Session("tiny")
    for p in adapters.values():
        s.add(p)
    blended = image(s, {"dog": 1.3, "locon": -0.7})
    assert not np.array_equal(blended, base_img)
    assert np.array_equal(image(s, {"dog": 0.0, "locon": (0.0, 0.0)}), base_img)
    assert_weights(weights(s.base), w0, 0.0)  # bit-identical after a non-zero blend was fused and removed
    assert base_img.std() > 1  # the tiny model draws noise, not a flat image


@pytest.mark.slow
def test_one_adapter_equals_the_merged_model(adapters):
    s = Session("tiny")
    s.add(adapters["dog"])
    ref = Session(base=merged_base([(adapters["dog"], 0.8, 0.8)]))
    assert_weights(weights(s.base), weights(load_base("tiny")), 0.0)  # adding alone changes nothing
    got = image(s, {"dog": 0.8})
    assert_weights(weights(s.base), weights(ref.base), 1e-6)
    assert rounding_only(got, image(ref))  # weights equal to float rounding, so the images are too
    assert not rounding_only(got, image(Session("tiny")))  # the adapter counts, far beyond rounding


@pytest.mark.slow
def test_two_adapters_blend_to_the_sum_of_deltas_without_reading_disk(adapters, tmp_path):
    """Files are deleted after loading: every strength change recomputes from memory, with no drift."""
    paths = {n: Path(shutil.copy(p, tmp_path / p.name)) for n, p in adapters.items()}
    s = Session("tiny")
    for p in paths.values():
        s.add(p)
    for p in paths.values():
        p.unlink()
    for strengths in ({"dog": 2.0}, {"dog": -1.0, "locon": 1.7}, {"locon": 0.3}, {"dog": 0.5, "locon": 2.0}):
        s.blender.set_strengths(strengths)
    blend = {"dog": (1.25, -0.5), "locon": 1.5}  # dog: text encoder 1.25, UNet -0.5 (A1111 order)
    got = image(s, blend)
    ref = Session(base=merged_base([(adapters["dog"], 1.25, -0.5), (adapters["locon"], 1.5, 1.5)]))
    assert_weights(weights(s.base), weights(ref.base), 1e-6)
    # the weights agree to float rounding (1e-6), and so do the images: a rounding flip moves a few uint8 values by 1
    assert rounding_only(got, image(ref))
    only_dog = Session(base=merged_base([(adapters["dog"], 1.25, -0.5)]))
    assert not rounding_only(got, image(only_dog))  # the second adapter counts, far beyond rounding


@pytest.mark.slow
def test_wrong_adapters_are_refused(adapters, tmp_path):
    s = Session("tiny")
    tensors, md = file_io.load(adapters["dog"])
    save_adapter(tensors, tmp_path / "xl.safetensors", md | {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SdloraError, match=r"xl.safetensors: this adapter is for SDXL .* model 'tiny' is SD 1.x"):
        s.add(tmp_path / "xl.safetensors")
    foreign = {k.replace("lora_unet_", "lora_transformer_").replace("lora_te_", "lora_t5_"): v
               for k, v in tensors.items()}
    save_adapter(foreign, tmp_path / "flux.safetensors", {})
    with pytest.raises(SdloraError, match=r"none of its 80 modules matches a module of 'tiny'"):
        s.add(tmp_path / "flux.safetensors")
    wide = {k: torch.cat([v, v], 1) if k.endswith("lora_down.weight") else v for k, v in tensors.items()}
    save_adapter(wide, tmp_path / "sd15.safetensors", md)
    with pytest.raises(SdloraError, match=r"shape .* trained for a different model"):
        s.add(tmp_path / "sd15.safetensors")
    partial = dict(tensors) | {"lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
                               "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4)}
    save_adapter(partial, tmp_path / "partial.safetensors", md)
    r = s.add(tmp_path / "partial.safetensors")
    assert r.unmatched == ["lora_unet_not_a_module"] and len(r.targets) == 80
    assert list(s.blender.adapters) == ["partial"]  # refused files left nothing behind


def test_parameters_round_trip():
    p = ImageParams(prompt="sks dog, \"quoted\"\nsecond line", negative="blurry, lowres", steps=30,
                    sampler="DPM++ 2M Karras", cfg=7.5, seed=123456789, width=512, height=768,
                    model="C:/models/sd15.safetensors",
                    loras=[LoraRef("dog", 0.8, 0.8, "0123456789ab"), LoraRef("style", 1.0, -0.25, "ba9876543210")],
                    extra={"Version": "sdlora 0.1.0"})
    text = format_parameters(p)
    assert text.splitlines()[1] == "second line <lora:dog:0.8> <lora:style:1:-0.25>"
    assert 'Lora hashes: "dog: 0123456789ab, style: ba9876543210"' in text
    assert parse_parameters(text) == p
    a1111 = ("a cat <lora:cat_v2:0.6>\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, "
             "Seed: 42, Size: 512x512, Model hash: abc, Model: v1-5, Lora hashes: \"cat_v2: 1a2b3c4d5e6f\"")
    q = parse_parameters(a1111)
    assert (q.prompt, q.negative, q.sampler, q.cfg, q.seed, q.model) == ("a cat", "ugly", "Euler a", 7.0, 42, "v1-5")
    assert q.loras == [LoraRef("cat_v2", 0.6, 0.6, "1a2b3c4d5e6f")] and q.extra == {"Model hash": "abc"}


@pytest.mark.slow
def test_cli_generate_writes_pngs_with_parameters(adapters, tmp_path, capsys):
    out = tmp_path / "imgs"
    cmd = ["generate", "--model", "tiny", "--prompt", SETTINGS["prompt"],
           "--negative", SETTINGS["negative"], "--seed", "7", "--steps", "4", "--guidance", "6.5",
           "--scheduler", "euler-a", "--size", "64x48", "--num-images", "2", "--out", str(out),
           "--lora", f"{adapters['dog']}:0.9", "--lora", f"{adapters['locon']}:1.5:-0.5"]
    proc = run_main(capsys, *cmd)
    assert proc.returncode == 0, proc.stderr
    files = [Path(line) for line in proc.stdout.split()]
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    s = Session("tiny")
    s.add(adapters["dog"]), s.add(adapters["locon"])
    results = s.generate(Settings(**(SETTINGS | {"scheduler": "euler-a", "width": 64, "height": 48, "num_images": 2})),
                         {"dog": 0.9, "locon": (1.5, -0.5)})
    for f, (img, params) in zip(files, results):
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(img))
        back = read_parameters(f)
        assert back == params
        assert (back.prompt, back.negative, back.sampler, back.cfg, back.width, back.height, back.model) == (
            SETTINGS["prompt"], SETTINGS["negative"], "Euler a", 6.5, 64, 48, "tiny")
        assert [(l.name, l.te, l.unet) for l in back.loras] == [("dog", 0.9, 0.9), ("locon", 1.5, -0.5)]
        assert all(len(l.hash) == 12 for l in back.loras)
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_cli_errors_are_one_line(adapters, tmp_path, capsys):
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    data = adapters["dog"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases = {
        str(tmp_path / "missing.safetensors"): "missing.safetensors: no such file",
        str(tmp_path / "old.ckpt"): "pickle",
        str(tmp_path / "cut.safetensors"): "truncated or corrupt",
        f"{adapters['dog']}:strong": "strength 'strong' is not a number",
    }
    for spec, want in cases.items():
        rc = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--lora", spec, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and want in err and err.count("\n") == 1, err
    assert parse_lora_spec(f"{adapters['dog']}") == (str(adapters["dog"]), 1.0, 1.0)
    assert parse_lora_spec("C:\\loras\\a.safetensors:-0.5") == ("C:\\loras\\a.safetensors", -0.5, -0.5)
    assert parse_lora_spec("a.safetensors:0.5:1e-1") == ("a.safetensors", 0.5, 0.1)
    rc = cli.main(["generate", "--model", "tiny", "--prompt", "x", "--size", "60x64", "--out", str(tmp_path)])
    assert rc == 2 and "multiple of 8" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_concurrent_requests_do_not_interleave(adapters):
    """The app serves requests from several threads: each gets the image of its own blend, as if alone."""
    from concurrent.futures import ThreadPoolExecutor

    s = Session("tiny")
    s.add(adapters["dog"]), s.add(adapters["locon"])
    blends = [{"dog": 1.0}, {"locon": -1.0}, {"dog": 0.5, "locon": (0.5, 2.0)}]
    want = [image(s, b) for b in blends]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda b: image(s, b), blends * 2))
    assert all(np.array_equal(g, want[i % 3]) for i, g in enumerate(got))
    assert not np.array_equal(want[0], want[1])
