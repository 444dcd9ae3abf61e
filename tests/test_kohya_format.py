"""The saved file: kohya names of the real SD 1.5 architecture, shapes, alpha, metadata, and diffusers loading."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sdlora.archs import meta_model
from sdlora.formats import meta
from sdlora.formats.file_io import load
from sdlora.models import load_base
from tests.helpers import train_tiny


def expected_sd15_names(unet_pattern: str, te_pattern: str) -> set[str]:
    """kohya module names of the real SD 1.5 UNet and CLIP ViT-L text encoder, built from their public configs on
    the meta device, derived here by hand: `lora_unet_` + diffusers path, `lora_te_text_model_` + path inside
    the text model, dots to underscores."""
    names = set()
    for name, _ in meta_model("sd15", "unet").named_modules():
        if re.fullmatch(unet_pattern, name):
            names.add("lora_unet_" + name.replace(".", "_"))
    for name, _ in meta_model("sd15", "text_encoder").named_modules():
        if re.fullmatch(te_pattern, name):
            inner = name.removeprefix("text_model.")  # transformers 4 has it, 5 does not
            names.add("lora_te_text_model_" + inner.replace(".", "_"))
    return names


def modules_in(state) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_default_preset_file_has_exactly_the_sd15_kohya_names(trained):
    state, _ = load(trained.path)
    want = expected_sd15_names(r".*attn2\.to_[qv]", r".*self_attn\.(q|k|v|out)_proj")
    assert len(want) == 32 + 48  # 16 transformer blocks x (q, v); 12 layers x 4 projections
    assert modules_in(state) == want
    # names every loader matches (docs/kohya-format.md §1), spelled out
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q" in want
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v" in want
    assert "lora_te_text_model_encoder_layers_11_self_attn_v_proj" in want
    assert len(state) == 3 * len(want)


@pytest.mark.slow
def test_full_preset_matches_kohyas_192_unet_and_72_te_modules(tmp_path):
    result = train_tiny(tmp_path / "full.safetensors", steps=1, preset="full")
    state, _ = load(result.path)
    unet = {m for m in modules_in(state) if m.startswith("lora_unet_")}
    te = {m for m in modules_in(state) if m.startswith("lora_te_")}
    assert (len(unet), len(te)) == (192, 72)  # kohya's LoRA-LierLa counts for SD 1.5, verified in the spec
    assert unet | te == expected_sd15_names(
        r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.0\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))",
        r".*(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
    # SD 1.x proj_in/proj_out are 1x1 convs: 4-d down/up
    key = "lora_unet_mid_block_attentions_0_proj_in"
    assert state[f"{key}.lora_down.weight"].dim() == 4 and state[f"{key}.lora_up.weight"].shape[2:] == (1, 1)


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_every_module_has_down_up_alpha_with_the_right_shapes(trained):
    state, _ = load(trained.path)
    base = load_base("tiny")
    by_name = {}
    for comp, model in base.components.items():
        for name, mod in model.named_modules():
            prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
            by_name[prefix + name.replace(".", "_")] = mod
    for m in modules_in(state):
        down, up, alpha = state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"], state[f"{m}.alpha"]
        w = by_name[m].weight
        assert down.shape == (4, w.shape[1]) and up.shape == (w.shape[0], 4)
        assert alpha.dim() == 0 and alpha.item() == 2.0  # alpha != rank is kept, never assumed
        assert torch.isfinite(down).all() and torch.isfinite(up).all()
    assert any(state[f"{m}.lora_up.weight"].abs().sum() > 0 for m in modules_in(state))


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_metadata_that_readers_rely_on(trained):
    state, md = load(trained.path)
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and float(md["ss_network_alpha"]) == 2.0
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_output_name"] == "dog"
    assert md["ss_resolution"] == "(64, 64)"
    assert md["ss_steps"] == "6" and md["ss_num_train_images"] == "5"
    assert md["modelspec.trigger_phrase"] == "sks dog"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(md["ss_tag_frequency"]) == {"dog": {"sks dog": 5}}
    assert md["ss_sd_model_name"] == "tiny"
    # kohya's hashes, recomputed from the file's own tensors and ss_* metadata
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == meta.addnet_hashes(state, md)
    assert md["sshs_legacy_hash"] == "e3b0c442"  # files under 1 MiB hash an empty slice, as kohya's do


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_file_hash_is_the_sha256_of_the_tensor_bytes(trained):
    import hashlib

    data = trained.path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    _, md = load(trained.path)
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.mark.slow
@pytest.mark.xdist_group("sd1-trained")
def test_diffusers_load_lora_weights_uses_every_key_and_fuses_to_w0_plus_scaled_up_down(trained, caplog):
    from peft.tuners.lora import LoraLayer

    state, _ = load(trained.path)
    base = load_base("tiny")
    originals = {f"{c}:{n}": m.weight.detach().clone() for c, model in base.components.items()
                 for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    pipe = base.pipeline()
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(trained.path), adapter_name="dog")  # raises on any key it cannot rename
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    n_file = len(modules_in(state))
    n_loaded = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) + \
        sum(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert n_loaded == n_file
    pipe.fuse_lora(adapter_names=["dog"], lora_scale=1.0)
    checked = 0
    for comp, model, prefix in (("unet", pipe.unet, "lora_unet_"), ("te", pipe.text_encoder, "lora_te_text_model_")):
        for name, m in model.named_modules():
            if not isinstance(m, LoraLayer):
                continue
            k = prefix + name.replace(".", "_")
            down, up = state[f"{k}.lora_down.weight"].float(), state[f"{k}.lora_up.weight"].float()
            alpha = state[f"{k}.alpha"].item()
            want = originals[f"{comp}:{name}"] + (alpha / down.shape[0]) * (up @ down)
            got = m.get_base_layer().weight
            assert torch.allclose(got, want, atol=1e-6), k
            checked += 1
    assert checked == n_file
