"""verify / inspect / convert / merge / resize on the tiny model, with kohya-layout files written here (LoCon 3x3,
no alpha), sdlora's own loading of diffusers/PEFT files, and each command as typed (`sdlora.cli.main`; verify's exit
code also from a real subprocess)."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.formats import convert, file_io, kohya, layouts, verify
from sdlora.formats.kohya import save
from sdlora.formats.read import read_adapter
from sdlora.models import load_base
from tests import reference
from tests.helpers import kohya_fixture, run_main, run_sdlora

PATTERN = r"attn2_to_[qv]$|self_attn_(q|k|v|out)_proj$|resnets_\d+_conv[12]$|downsamplers_0_conv$"
MD = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_sd_model_name": "tiny", "ss_network_dim": "4",
      "ss_network_alpha": "2.0", "modelspec.trigger_phrase": "sks dog", "ss_tag_frequency": '{"d": {"sks dog": 3}}'}


@pytest.fixture(scope="session")
def base():
    return load_base("tiny")


@pytest.fixture(scope="session")
def files(base, tmp_path_factory):
    """A kohya file with LoCon 3x3 convs and alpha != rank, the same without alpha, and its diffusers/PEFT copies."""
    d = tmp_path_factory.mktemp("tools")
    table = layouts.table_of(base.components, "sd1")
    locon = save(kohya_fixture(table, PATTERN, rank=4, alpha=2.0), d / "locon.safetensors", MD)
    noalpha = save(kohya_fixture(table, PATTERN, rank=4, alpha=None, seed=1), d / "noalpha.safetensors", MD)
    convert.convert(locon, d / "locon-diffusers.safetensors", "diffusers")
    convert.convert(locon, d / "locon-peft", "peft")
    return {"dir": d, "locon": locon, "noalpha": noalpha, "diffusers": d / "locon-diffusers.safetensors",
            "peft": d / "locon-peft"}


def test_fixture_is_in_kohyas_layout(files):
    state, _ = file_io.load(files["locon"])
    k = "lora_unet_down_blocks_0_resnets_1_conv2"
    assert state[f"{k}.lora_down.weight"].shape[2:] == (3, 3) and state[f"{k}.lora_up.weight"].shape[2:] == (1, 1)
    assert state[f"{k}.alpha"].dim() == 0 and state[f"{k}.alpha"].item() == 2.0
    assert not any(k.endswith(".alpha") for k in file_io.load(files["noalpha"])[0])


@pytest.mark.slow
@pytest.mark.subprocess
def test_verify_cli_exit_codes(files, capsys):
    from sdlora.cli import main

    ok = run_sdlora("verify", files["locon"], "--json")  # the exit code as a shell sees it
    assert ok.returncode == 0, ok.stdout + ok.stderr
    d = json.loads(ok.stdout)
    assert d["ok"] and d["arch"] == "sd1" and set(d["tools"]) == {"kohya", "diffusers", "ComfyUI", "A1111"}
    assert "lists it only while an SD 1.x checkpoint is loaded" in d["tools"]["A1111"]
    assert main(["verify", str(files["locon"])]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert main(["verify", str(files["noalpha"]), "--model", "tiny"]) == 1
    assert "have no alpha" in capsys.readouterr().out


def test_verify_against_a_loaded_model(files, base):
    rep = verify.verify_file(files["locon"], model=base)
    assert rep.ok and rep.modules == len(file_io.load(files["locon"])[0]) // 3
    assert rep.against == "the loaded model 'tiny'"


def test_inspect_reads_kohya_diffusers_and_peft_alike(files, capsys):
    from sdlora.inspect_lora import describe

    kinds = [describe(files[k]) for k in ("locon", "diffusers", "peft")]
    assert [d["format"] for d in kinds] == ["kohya", "diffusers", "peft"]
    for d in kinds:
        assert d["arch"] == "sd1" and d["trigger"] == "sks dog" and d["top_tags"] == [("sks dog", 3)]
        assert d["modules"] == kinds[0]["modules"] and d["parameters"] == kinds[0]["parameters"]
        groups = {(r["component"], r["group"]): r for r in d["groups"]}
        assert groups[("unet", "attentions.attn2.to_q")]["scale"] == "0.5"  # alpha 2 / rank 4
        assert groups[("unet", "resnets.conv2")]["modules"] == 22
    out = run_main(capsys, "inspect", files["peft"])
    assert out.returncode == 0, out.stderr
    assert "scale 0.5" in out.stdout and "modelspec.trigger_phrase = sks dog" in out.stdout


def test_convert_cli_prints_counts_and_round_trips(files, tmp_path, capsys):
    n = len(file_io.load(files["locon"])[0]) // 3
    r = run_main(capsys, "convert", files["diffusers"], tmp_path / "back.safetensors", "--to", "kohya")
    assert r.returncode == 0, r.stderr
    assert f"{n} modules converted, 0 keys skipped, 0 unknown" in r.stdout
    a, b = file_io.load(files["locon"])[0], file_io.load(tmp_path / "back.safetensors")[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_no_alpha_gets_an_explicit_alpha_only_when_asked(files, tmp_path):
    convert.convert(files["noalpha"], tmp_path / "d.safetensors", "diffusers")
    convert.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    assert not any(k.endswith(".alpha") for k in file_io.load(tmp_path / "k.safetensors")[0])  # still as it was
    convert.convert(files["noalpha"], tmp_path / "fixed.safetensors", "kohya", alpha_if_missing=4)
    assert verify.verify_file(tmp_path / "fixed.safetensors").ok


def _blend_weights(model_files, strengths):
    from sdlora.infer.blend import Blender

    b = load_base("tiny")
    bl = Blender(b)
    names = []
    for f in model_files:
        names.append(bl.add(read_adapter(f)).file.name)
    bl.set_strengths(dict(zip(names, strengths)))
    return b


@pytest.mark.parametrize("path,prefix", [
    ("locon-diffusers.safetensors", "lora_"),
    ("locon-peft", "lora_"),
    ("locon-peft/unet/adapter_model.safetensors", "lora_unet_"),
    ("locon-peft/text_encoder/adapter_model.safetensors", "lora_te_"),
], ids=["diffusers", "peft-folder", "peft-unet-file", "peft-text_encoder-file"])
def test_sdlora_loads_diffusers_and_peft_files_like_the_kohya_file(files, path, prefix):
    """The one reader (what generate, merge and eval read adapters with) gives the diffusers file, the PEFT folder and
    each of the folder's bare adapter_model.safetensors (alpha from the adapter_config.json beside it) the kohya
    file's modules (those of that component for a bare file): the same down/up factors and the same alpha, hence the
    same fused weights."""
    ref = read_adapter(files["locon"])
    want = {k: m for k, m in ref.modules.items() if k.startswith(prefix)}
    assert len(want) > 40 and {m.alpha for m in want.values()} == {2.0}  # alpha 2 != rank 4: a scale of 0.5
    got = read_adapter(files["dir"] / path)
    assert sorted(got.modules) == sorted(want) and got.unknown == [] and got.arch == "sd1"
    for name, m in want.items():
        g = got.modules[name]
        assert torch.equal(m.tensors["down"], g.tensors["down"]) and torch.equal(m.tensors["up"], g.tensors["up"])
        assert g.alpha == m.alpha, name


def test_locon_and_no_alpha_files_generate(files, tmp_path):
    from sdlora.cli import main

    assert main(["generate", "--model", "tiny", "--lora", f"{files['locon']}:0.7", "--lora", f"{files['noalpha']}:0.3",
               "--lora", f"{files['diffusers']}:0.2", "--prompt", "sks dog", "--steps", "2", "--size", "32",
               "--out", str(tmp_path / "x.png")]) == 0
    assert main(["generate", "--model", "tiny", "--prompt", "sks dog", "--steps", "2", "--size", "32",
                 "--out", str(tmp_path / "base.png")]) == 0
    from PIL import Image

    from sdlora.formats.a1111 import read_parameters

    # the three files were applied (the image is not the base model's) and are recorded in the PNG
    assert list(Image.open(tmp_path / "x.png").getdata()) != list(Image.open(tmp_path / "base.png").getdata())
    assert len(read_parameters(tmp_path / "x.png").loras) == 3


@pytest.mark.slow
def test_merge_single_file_loads_in_diffusers_with_the_fused_output(files, tmp_path, base):
    from diffusers import StableDiffusionPipeline

    from sdlora.merge import merge

    base.pipeline().save_pretrained(tmp_path / "cfg")
    loras = [(str(files["locon"]), 0.8, 0.8), (str(files["noalpha"]), 0.5, 0.25)]
    merge("tiny", loras, tmp_path / "merged.safetensors", dtype="fp32")
    keys = file_io.load(tmp_path / "merged.safetensors")[0]
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    pipe = StableDiffusionPipeline.from_single_file(str(tmp_path / "merged.safetensors"), config=str(tmp_path / "cfg"),
                                                    local_files_only=True, safety_checker=None)
    ref = _blend_weights([files["locon"], files["noalpha"]], [(0.8, 0.8), (0.5, 0.25)])
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 200, (1, 77), generator=g)
    with torch.no_grad():
        e_ref, e = ref.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        assert torch.equal(e_ref, e)
        out_ref, out = ref.unet(x, 10, e_ref).sample, pipe.unet(x, 10, e).sample
        plain = load_base("tiny").unet(x, 10, e_ref).sample
        assert torch.allclose(out, out_ref, atol=1e-5, rtol=0)
        assert (out - plain).abs().max() > 1e-3  # the adapters changed something
        assert torch.equal(ref.vae.decode(x).sample, pipe.vae.decode(x).sample)


def test_merge_cli_to_a_diffusers_folder(files, tmp_path, capsys):
    r = run_main(capsys, "merge", "--model", "tiny", "--lora", f"{files['locon']}:0.8", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")
    ref = _blend_weights([files["locon"]], [0.8])
    for (n, p), (n2, p2) in zip(unet.state_dict().items(), ref.unet.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n


def test_merge_ldm_layout_of_sd2_and_sdxl_text_encoders_inverts_diffusers():
    """OpenCLIP export (SD 2.x text encoder, SDXL te2) round-trips through diffusers' single-file conversion."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdlora.merge import openclip_to_ldm_state

    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                    num_hidden_layers=3, projection_dim=16, hidden_act="gelu"))
    ck = openclip_to_ldm_state(te, "conditioner.embedders.1.model.")
    assert ck["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (96, 32)
    converted = convert_open_clip_checkpoint(te, ck, "conditioner.embedders.1.model.")
    back = {kohya.te_path(k): v for k, v in converted.items()}
    sd = {kohya.te_path(k): v for k, v in te.state_dict().items() if "position_ids" not in k}
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_resize_keeps_scale_and_reports_the_energy(files, tmp_path, capsys):
    from sdlora.resize import resize

    # same rank: the delta is unchanged
    frac, _ = resize(files["locon"], tmp_path / "r4.safetensors", 4)
    a, b = file_io.load(files["locon"])[0], file_io.load(tmp_path / "r4.safetensors")[0]
    ga, gb = reference.group(a), reference.group(b)
    for m in ga:
        da = reference.lora_delta(ga[m]["lora_down.weight"], ga[m]["lora_up.weight"], ga[m]["alpha"].item())
        db = reference.lora_delta(gb[m]["lora_down.weight"], gb[m]["lora_up.weight"], gb[m]["alpha"].item())
        assert torch.allclose(da, db, atol=1e-6), m
    assert frac == pytest.approx(1.0, abs=1e-9)
    # rank 2: the best rank-2 approximation; energy fraction from singular values computed here
    r = run_main(capsys, "resize", files["locon"], "--rank", "2", "--out", tmp_path / "r2.safetensors")
    assert r.returncode == 0, r.stderr
    c = reference.group(file_io.load(tmp_path / "r2.safetensors")[0])
    kept = total = 0.0
    for m in ga:
        d = reference.lora_delta(ga[m]["lora_down.weight"], ga[m]["lora_up.weight"], ga[m]["alpha"].item())
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        kept, total = kept + float((s[:2] ** 2).sum()), total + float((s ** 2).sum())
        assert c[m]["lora_down.weight"].shape[0] == 2 and c[m]["alpha"].item() == pytest.approx(1.0)  # 2/4 * 2
        dc = reference.lora_delta(c[m]["lora_down.weight"], c[m]["lora_up.weight"], c[m]["alpha"].item())
        assert float(((d - dc) ** 2).sum()) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-4, abs=1e-10)
    assert f"kept {kept / total:.2%}" in r.stdout
    assert verify.verify_file(tmp_path / "r2.safetensors").ok
