"""Names per architecture (golden key sets on the meta device), diffusers<->LDM maps checked against diffusers' own
single-file conversion, A1111's mapping against LDM names, verify and convert round trips."""

from __future__ import annotations

import re

import pytest
import torch

from sdlora.archs import get as arch_spec
from sdlora.archs import load_config, meta_components
from sdlora.config import make_config
from sdlora.errors import SdloraError
from sdlora.formats import convert, file_io, kohya, layouts, meta, read, verify
from sdlora.lora.targets import find_targets
from tests.helpers import kohya_fixture

ARCHS = ("sd1", "sd2", "sdxl")
VERSION = {"sd1": "sd_v1", "sd2": "sd_v2_768_v", "sdxl": "sdxl_base_v1-0"}
LOCON = r"lora_unet_.*(resnets_\d+_(conv1|conv2|conv_shortcut|time_emb_proj)|downsamplers_0_conv|upsamplers_0_conv|" \
        r"_\d+_0_(in_layers_2|out_layers_3|skip_connection|emb_layers_1)|_0_op|_\d_conv)"


def verify_sd(sd: dict, md: dict, arch: str | None = None) -> verify.VerifyReport:
    """verify on a kohya state dict, read as the one reader reads files."""
    return verify.verify(read.parse(sd, md), arch=arch)


def preset_names(arch: str, preset: str) -> set[str]:
    """kohya names of `preset` on the real `arch`, from sdlora's target finder and kohya_name."""
    return {kohya.kohya_name(c, n, arch) for c, m in meta_components(arch).items()
            for n in find_targets(m, "unet" if c == "unet" else "te", preset)}


# ----------------------------------------------------------------------------------------------------------
# golden key sets


@pytest.mark.parametrize("arch,counts", [("sd1", {"unet": 192, "te": 72}), ("sd2", {"unet": 192, "te": 138}),
                                         ("sdxl", {"unet": 722, "te1": 72, "te2": 192})])
def test_full_preset_counts_match_kohyas_verified_numbers(arch, counts):
    names = preset_names(arch, "full")
    got = {c: sum(n.startswith(kohya.PREFIX[c] + "_") for n in names) for c in counts}
    assert got == counts  # docs/kohya-format.md §1, verified against kohya's reference files
    assert names <= set(layouts.kohya_table(arch))


def test_golden_names_per_architecture():
    sd1, sd2, xl = (preset_names(a, "full") for a in ARCHS)
    # SD 1.x/2.x: diffusers-style UNet, lora_te_text_model_ (the transformers-5 pitfall: text_model_ kept)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q" in sd1 & sd2
    assert "lora_te_text_model_encoder_layers_11_self_attn_v_proj" in sd1
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2" in sd2 and not any("layers_23" in n for n in sd2)
    assert not any(n.startswith("lora_te_encoder_") for n in sd1 | sd2)
    # SDXL: SGM UNet names, te1/te2 prefixes
    for n in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
              "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k", "lora_unet_output_blocks_2_1_proj_in",
              "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2",
              "lora_te1_text_model_encoder_layers_11_mlp_fc1",
              "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"):
        assert n in xl, n
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_te_")) for n in xl)


def test_shapes_of_the_real_architectures():
    t1, t2, tx = (layouts.kohya_table(a) for a in ARCHS)
    assert t1["lora_unet_mid_block_attentions_0_proj_in"] == layouts.Module("unet", "mid_block.attentions.0.proj_in",
                                                                            (1280, 1280, 1, 1), True)
    assert t2["lora_unet_mid_block_attentions_0_proj_in"].shape == (1280, 1280)  # linear projection in SD 2.x
    assert t2["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].shape == (320, 1024)
    assert tx["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"].shape == (640, 2048)
    assert t2["lora_te_text_model_encoder_layers_0_mlp_fc1"].shape == (4096, 1024)
    assert tx["lora_te2_text_model_encoder_layers_0_mlp_fc1"].shape == (5120, 1280)


# ----------------------------------------------------------------------------------------------------------
# diffusers <-> LDM UNet names, against diffusers' own single-file conversion


def small_unet_config(arch: str) -> dict:
    cfg = load_config(arch, "unet")
    n = len(cfg["block_out_channels"])
    small = dict(cfg, block_out_channels=[16, 16, 32, 32][:n], norm_num_groups=8, cross_attention_dim=16,
                 attention_head_dim=4 if arch == "sd1" else [2] * n)
    if arch == "sdxl":
        small.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
                     addition_embed_type_num_heads=2)
    return small


@pytest.mark.parametrize("arch", ARCHS)
def test_unet_ldm_names_invert_diffusers_single_file_conversion(arch):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel.from_config(small_unet_config(arch))  # same module tree as the real one
    sd = unet.state_dict()
    ldm = {"model.diffusion_model." + kohya.unet_to_ldm(k, arch): v for k, v in sd.items()}
    assert len(ldm) == len(sd)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    assert all(kohya.unet_from_ldm(kohya.unet_to_ldm(k, arch), arch) == k for k in sd)


def test_unet_ldm_examples():
    assert kohya.unet_to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert kohya.unet_to_ldm("up_blocks.0.upsamplers.0.conv", "sd1") == "output_blocks.2.1.conv"
    assert kohya.unet_to_ldm("up_blocks.0.upsamplers.0.conv", "sdxl") == "output_blocks.2.2.conv"
    assert kohya.unet_to_ldm("down_blocks.1.resnets.0.conv_shortcut.weight", "sd1") == \
        "input_blocks.4.0.skip_connection.weight"


# ----------------------------------------------------------------------------------------------------------
# A1111 mapping (docs/kohya-format.md §5) against LDM names


@pytest.mark.parametrize("arch", ARCHS)
def test_a1111_maps_every_full_and_locon_module_to_an_ldm_layer(arch):
    table = layouts.kohya_table(arch)
    layers = layouts.a1111_layers(arch)
    names = preset_names(arch, "full") | {k for k in table if re.search(LOCON, k)}
    mapped = {n: kohya.a1111_name(n, arch, layers) for n in names}
    assert all(mapped.values()), [n for n, v in mapped.items() if v is None][:3]
    # each lands on the LDM module of the same diffusers module
    for n, layer in mapped.items():
        m = table[n]
        if m.component == "unet":
            assert layer == "diffusion_model_" + kohya.unet_to_ldm(m.path, arch).replace(".", "_")
    if arch == "sd1":
        assert mapped["lora_unet_up_blocks_1_resnets_2_conv1"] == "diffusion_model_output_blocks_5_0_in_layers_2"
        assert mapped["lora_te_text_model_encoder_layers_3_mlp_fc2"] == \
            "transformer_text_model_encoder_layers_3_mlp_fc2"
    if arch == "sd2":  # OpenCLIP: q/k/v fall back to the fused in_proj of `attn`
        assert mapped["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == "model_transformer_resblocks_0_attn"
        assert mapped["lora_te_text_model_encoder_layers_0_mlp_fc1"] == "model_transformer_resblocks_0_mlp_c_fc"
    if arch == "sdxl":
        assert mapped["lora_te2_text_model_encoder_layers_5_self_attn_out_proj"] == \
            "1_model_transformer_resblocks_5_attn_out_proj"
        assert mapped["lora_te1_text_model_encoder_layers_5_self_attn_k_proj"] == \
            "0_transformer_text_model_encoder_layers_5_self_attn_k_proj"


def test_a1111_layers_are_the_ldm_checkpoint_modules():
    """The UNet layer names A1111 builds equal the module names of an LDM state dict written from diffusers."""
    from diffusers import UNet2DConditionModel

    for arch in ("sd1", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(load_config(arch, "unet"))
        ldm_modules = {"diffusion_model_" + kohya.unet_to_ldm(k, arch).rsplit(".", 1)[0].replace(".", "_")
                       for k in unet.state_dict() if k.endswith(".weight")}
        unet_layers = {n for n in layouts.a1111_layers(arch) if n.startswith("diffusion_model_")}
        linear_conv = {n for n in ldm_modules if n in unet_layers}
        assert len(linear_conv) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())


# ----------------------------------------------------------------------------------------------------------
# verify


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_passes_full_preset_and_locon_files_of_each_arch(arch):
    table = layouts.kohya_table(arch)
    full = "|".join(re.escape(n) + "$" for n in preset_names(arch, "full"))
    sd = kohya_fixture(table, full + "|" + LOCON, rank=1)
    rep = verify_sd(sd, {"ss_base_model_version": VERSION[arch], "ss_v2": str(arch == "sd2")})
    assert rep.ok, rep.lines()
    assert rep.arch == arch and rep.modules == len(sd) // 3
    assert rep.tools["A1111"].startswith(f"applies {rep.modules}/{rep.modules}")


def test_verify_catches_each_problem():
    table = layouts.kohya_table("sd1")
    pattern = r"attn2_to_[qv]$|self_attn_(q|k|v|out)_proj$"
    md = {"ss_base_model_version": "sd_v1", "ss_v2": "False"}
    assert verify_sd(kohya_fixture(table, pattern), md).ok

    def problems(sd, md=md, arch=None):
        rep = verify_sd(sd, md, arch=arch)
        assert not rep.ok
        return " | ".join(rep.problems)

    sd = kohya_fixture(table, pattern)
    sd["lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = sd.pop(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
    assert "3 key(s) are not parts of a LoRA module" in problems(sd)  # the renamed down, its orphaned up and alpha
    sd = kohya_fixture(table, pattern)
    for s in ("lora_down.weight", "lora_up.weight", "alpha"):  # transformers-5 naming without text_model_
        sd[f"lora_te_encoder_layers_0_mlp_fc1.{s}"] = sd[f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{s}"]
    p = problems(sd)
    assert "kohya: 1 module(s) name no module" in p and "ComfyUI: 1 module(s)" in p and "A1111: 1 module(s)" in p
    sd = kohya_fixture(table, pattern)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"  # weight [320, 768]
    sd[f"{k}.lora_up.weight"], sd[f"{k}.lora_down.weight"] = sd[f"{k}.lora_down.weight"].T, sd[f"{k}.lora_up.weight"].T
    assert "shapes that do not fit" in problems(sd)
    sd = kohya_fixture(table, pattern)
    sd[f"{k}.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(SdloraError, match=f"module {k} holds NaN or Inf values in its up weight"):
        verify_sd(sd, md)  # the reader refuses a damaged file outright
    assert "no alpha" in problems(kohya_fixture(table, pattern, alpha=None))
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v)
            for k, v in kohya_fixture(table, pattern).items()}
    assert "delta is empty" in problems(zero)
    qv = kohya_fixture(table, r"attn2_to_[qv]$|self_attn_[qv]_proj$")  # diffusers' "Could not infer" case
    assert "diffusers: load_lora_weights rejects" in problems(qv)
    assert "A1111 files it under SD 1.x" in problems(kohya_fixture(layouts.kohya_table("sdxl"), r"attn2_to_q$"),
                                                      md={"ss_base_model_version": "sd_v1"}, arch="sdxl")
    sd2qv = kohya_fixture(layouts.kohya_table("sd2"), r"attn2_to_q$|self_attn_(q|k|v)_proj$|mlp_fc1$")
    assert "OpenCLIP attention layer(s) lack one of q/k/v/out_proj" in problems(sd2qv, md={"ss_v2": "True"})


# ----------------------------------------------------------------------------------------------------------
# metadata for SD2 / SDXL


@pytest.mark.parametrize("arch,pred,version,spec,v2", [
    ("sd1", "epsilon", "sd_v1", "stable-diffusion-v1/lora", "False"),
    ("sd2", "v_prediction", "sd_v2_768_v", "stable-diffusion-v2-768-v/lora", "True"),
    ("sd2", "epsilon", "sd_v2_512", "stable-diffusion-v2-512/lora", "True"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False")])
def test_metadata_per_architecture(arch, pred, version, spec, v2):
    from datetime import datetime, timezone

    v = arch_spec(arch).kohya_version(pred)
    cfg = make_config(dict(images="x", prompt="ohwx", out="o.safetensors", rank=4, alpha=4, preset="full"))
    md = meta.build(cfg, meta.RunStats(spec=arch_spec(arch), base_model_version=v, model_name="m", targets={},
                                       resolution=1024, steps=10, num_images=3, num_reg_images=0,
                                       tag_frequency={"x": {"ohwx": 3}}, started=datetime.now(timezone.utc)))
    assert (v, md["ss_base_model_version"], md["modelspec.architecture"], md["ss_v2"]) == (version, version, spec, v2)
    assert md["modelspec.resolution"] == "1024x1024" and md["modelspec.trigger_phrase"] == "ohwx"
    assert verify.file_arch(md) == arch  # what A1111 files it under


# ----------------------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_convert_there_and_back_is_identical(tmp_path, arch, to):
    from sdlora.formats.kohya import save

    table = layouts.kohya_table(arch)
    sd = kohya_fixture(table, r"transformer_blocks_0_attn2_to_[qv]$|transformer_blocks_1_attn1_to_k$|"
                              r"layers_[01]_self_attn_(q|k|v|out)_proj$|layers_0_mlp_fc1$|" + LOCON[:-1] + r")$",
                       rank=2, alpha=1.0, dtype=torch.float16)
    k = next(n for n in sd if n.endswith("conv1.alpha") or n.endswith("in_layers_2.alpha"))
    del sd[k]  # one LoCon module without alpha
    other = next(n for n in sd if n.endswith("attn2_to_q.alpha"))
    sd[other] = torch.tensor(3.0, dtype=torch.float16)  # per-module alpha != the common one
    md = {"ss_base_model_version": VERSION[arch], "ss_v2": str(arch == "sd2"), "ss_output_name": "x"}
    src = save(sd, tmp_path / "k.safetensors", md)
    mid = tmp_path / ("d.safetensors" if to == "diffusers" else "peft")
    rep = convert.convert(src, mid, to)
    assert (rep.converted, rep.skipped, rep.unknown) == (len(sd) // 3 + (len(sd) % 3 > 0), [], [])
    convert.convert(mid, tmp_path / "back.safetensors", "kohya")
    a, ma = file_io.load(src)
    b, mb = file_io.load(tmp_path / "back.safetensors")
    assert set(a) == set(b) and ma == mb
    assert all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)


def test_diffusers_file_loads_in_diffusers_with_the_alphas(tmp_path):
    """The diffusers output is what load_lora_weights reads, per-module alphas included (from lora_adapter_metadata)."""
    from peft.tuners.lora import LoraLayer

    from sdlora.formats.kohya import save
    from sdlora.models import load_base
    from tests import reference

    base = load_base("tiny")
    table = layouts.table_of(base.components, "sd1")
    sd = kohya_fixture(table, r"attn2_to_[qv]$|self_attn_(q|k|v|out)_proj$", rank=4, alpha=2.0)
    sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.alpha"] = torch.tensor(8.0)
    save(sd, tmp_path / "k.safetensors", {"ss_base_model_version": "sd_v1"})
    convert.convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    before = {n: m.weight.detach().clone() for n, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    pipe = base.pipeline()
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="x")
    pipe.fuse_lora(adapter_names=["x"], lora_scale=1.0)
    checked = 0
    for name, m in pipe.unet.named_modules():
        if isinstance(m, LoraLayer):
            k = kohya.kohya_name("unet", name)
            want = before[name] + reference.lora_delta(sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"],
                                                       sd[f"{k}.alpha"].item()).float()
            assert torch.allclose(m.get_base_layer().weight, want, atol=1e-6), k
            checked += 1
    assert checked == 32


def test_detect_format(tmp_path):
    assert read.detect_format(["lora_unet_x.lora_down.weight"]) == "kohya"
    assert read.detect_format(["lora_te_x.lora_up.weight", "stray_key"]) == "kohya"  # a stray key: still kohya
    assert read.detect_format(["unet.down_blocks.0.x.lora_A.weight"]) == "diffusers"
    assert read.detect_format(["text_encoder_2.text_model.x.lora_B.weight"]) == "diffusers"
    assert read.detect_format(["base_model.model.x.lora_A.weight"]) == "peft"
    assert read.detect_format([]) == read.detect_format(["model.diffusion_model.x.weight"]) == "unknown"
    # every format convert writes is recognised as itself when read back
    table = layouts.kohya_table("sd1")
    src = tmp_path / "k.safetensors"
    pattern = r"down_blocks_0_attentions_0_.*attn2_to_q$|layers_0_self_attn_q_proj$"
    file_io.atomic_save(kohya_fixture(table, pattern), src, {})
    convert.convert(src, tmp_path / "d.safetensors", "diffusers")
    convert.convert(src, tmp_path / "peft", "peft")
    files = {"kohya": [src], "diffusers": [tmp_path / "d.safetensors"],
             "peft": sorted((tmp_path / "peft").glob("*/adapter_model.safetensors"))}
    assert set(files) == set(convert.FORMATS) and len(files["peft"]) == 2  # unet/, text_encoder/
    for fmt, paths in files.items():
        for f in paths:
            assert read.detect_format(file_io.load(f)[0]) == fmt, f
