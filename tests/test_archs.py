"""SD 2.x and SDXL: the built-in tiny models have the real module trees, and training, saving, verifying,
diffusers loading and generation work end to end on them."""

from __future__ import annotations

import pytest
import torch

from sdlora.archs import meta_components
from sdlora.formats.file_io import load
from sdlora.formats.verify import verify_file
from sdlora.lora.targets import find_targets
from sdlora.models import load_base
from tests.helpers import run_main, train_tiny

MODELS = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


def _tree(model: torch.nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()}


@pytest.mark.parametrize("name,arch", MODELS.items())
def test_tiny_models_have_the_real_module_tree(name, arch):
    base = load_base(name)
    assert base.arch == arch
    real = meta_components(arch)
    assert set(base.components) == set(real)
    from sdlora.archs import meta_model

    for comp, model in base.components.items():
        assert _tree(model) == _tree(real[comp]), comp  # same names and module classes, only widths differ
    assert _tree(base.vae) == _tree(meta_model(arch, "vae"))


@pytest.mark.parametrize("name,version,prediction", [("tiny-sd2", "sd_v2_768_v", "v_prediction"),
                                                      ("tiny-sdxl", "sdxl_base_v1-0", "epsilon")])
@pytest.mark.slow
def test_sd2_and_sdxl_train_save_and_verify(tmp_path, name, version, prediction):
    result = train_tiny(tmp_path / f"{name}.safetensors", model=name, steps=2)
    base = result.base
    assert base.prediction_type == prediction
    state, md = load(result.path)
    assert md["ss_base_model_version"] == version
    assert md["ss_v2"] == ("True" if name == "tiny-sd2" else "False")
    # the file holds exactly the kohya names of the real architecture's default targets
    real = meta_components(base.arch)
    from sdlora.formats.kohya import kohya_name

    want = {kohya_name(c, n, base.arch) for c, m in real.items() for n in find_targets(m, c, "default")}
    got = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert got == want
    if name == "tiny-sdxl":
        # kohya's SDXL names: SGM UNet paths, lora_te1_/lora_te2_ prefixes
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in got
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v" in got
        assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in got)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_31_") for k in got)
        assert len([k for k in got if k.startswith("lora_unet_")]) == 140
    else:
        assert len([k for k in got if k.startswith("lora_te_text_model_encoder_layers_")]) == 23 * 4
    assert verify_file(result.path).ok


@pytest.mark.slow
@pytest.mark.xdist_group("sdxl-adapter")
def test_sdxl_adapter_loads_in_diffusers_and_blends_exactly(trained_adapter):
    from peft.tuners.lora import LoraLayer

    from sdlora.formats import kohya
    from sdlora.infer.session import Session, Settings
    from tests import reference

    result = trained_adapter("xl", model="tiny-sdxl", steps=2, lr=5e-3)
    state, _ = load(result.path)
    n_modules = len(state) // 3

    pipe = load_base("tiny-sdxl").pipeline()
    pipe.load_lora_weights(str(result.path), adapter_name="xl")
    loaded = sum(isinstance(m, LoraLayer) for comp in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                 for m in comp.modules())
    assert loaded == n_modules

    # sdlora's own blend at strength 0.7 equals the weights merged by hand from the file
    session = Session("tiny-sdxl")
    session.add(result.path)
    settings = Settings(prompt="sks dog", steps=3, seed=5)
    base_img = session.generate(settings, {})[0][0]
    blended = session.generate(settings, {"xl": 0.7})[0][0]
    merged = load_base("tiny-sdxl")
    table = {kohya.kohya_name(c, n, "sdxl"): m
             for c, model in merged.components.items() for n, m in model.named_modules()}
    groups = reference.group(state)
    with torch.no_grad():
        for mod, t in groups.items():
            w = table[mod].weight
            delta = reference.lora_delta(t["lora_down.weight"], t["lora_up.weight"], t["alpha"].item())
            w += (0.7 * delta).reshape(w.shape).to(w.dtype)
    merged_img = Session("tiny-sdxl", base=merged).generate(settings, {})[0][0]
    assert list(blended.getdata()) == list(merged_img.getdata())
    assert list(blended.getdata()) != list(base_img.getdata())


@pytest.mark.slow
@pytest.mark.xdist_group("sdxl-adapter")
def test_sdxl_merge_to_a_diffusers_folder_equals_the_fused_adapter(tmp_path, trained_adapter, capsys):
    from sdlora.infer.session import Session
    from sdlora.train.step import encode_text

    result = trained_adapter("xl", model="tiny-sdxl", steps=2, lr=5e-3)
    p = run_main(capsys, "merge", "--model", "tiny-sdxl", "--lora", f"{result.path}:0.8", "--dtype", "fp32",
                 "--out", tmp_path / "merged")
    assert p.returncode == 0, p.stderr
    merged = load_base(str(tmp_path / "merged"))
    session = Session("tiny-sdxl")
    session.blender.set_strengths({session.add(result.path).file.name: 0.8})
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    outs = []
    with torch.no_grad():
        for base in (merged, session.base, load_base("tiny-sdxl")):
            hidden, pooled = encode_text(base.spec, list(base.text_encoders.values()), ["sks dog"])
            added = {"text_embeds": pooled, "time_ids": time_ids}
            outs.append(base.unet(latents, t, hidden, added_cond_kwargs=added).sample)
    assert merged.arch == "sdxl"
    assert (outs[0] - outs[1]).abs().max().item() < 1e-6
    assert (outs[0] - outs[2]).abs().max().item() > 1e-4  # the merge did change the model
