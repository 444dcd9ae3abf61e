"""Single-file checkpoints in the original LDM/SGM layouts load with no network: configs derived from the tensors,
weights converted, tokenizers built from the shipped BPE file (sdlora/formats/checkpoint.py)."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from safetensors.torch import save_file

from sdlora import archs
from sdlora.archs.clip_tokenizer import VOCAB_SIZE, clip_tokenizer
from sdlora.errors import SdloraError
from sdlora.formats import checkpoint as C
from sdlora.merge import clip_to_ldm_state, ldm_state_dict, openclip_to_ldm_state, unet_to_ldm_state, vae_to_ldm_state
from sdlora.models import detect_checkpoint_arch, load_base


@pytest.fixture
def offline(monkeypatch):
    """No network at all: the hub flag set, and any socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write(base, path, metadata=True, sd=None):
    sd = ldm_state_dict(base) if sd is None else sd
    save_file(sd, str(path), C.ldm_metadata(base) if metadata else {"format": "pt"})
    return path


def _config(module) -> dict:
    cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return {k: v for k, v in cfg.items() if k not in ("_use_default_values", "_name_or_path", "transformers_version")}


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_single_file_loads_offline_as_the_model_it_was_written_from(name, tmp_path, offline):
    ref = load_base(name)
    path = _write(ref, tmp_path / f"{name}.safetensors")
    got = load_base(str(path))
    assert got.spec is ref.spec and got.prediction_type == ref.prediction_type
    assert got.native_resolution == ref.native_resolution
    for attr, module in ref.modules.items():
        assert _config(got.modules[attr]) == _config(module), attr
        mine, theirs = got.modules[attr].state_dict(), module.state_dict()
        assert set(mine) == set(theirs), attr
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), attr
    g = torch.Generator().manual_seed(0)
    prompt = ["a sks dog, photo"]
    with torch.no_grad():
        hidden = []
        for c, (tok, te) in ref.text_encoders.items():
            tok2, te2 = got.text_encoders[c]
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            ids2 = tok2(prompt, padding="max_length", max_length=tok2.model_max_length, return_tensors="pt").input_ids
            assert torch.equal(ids, ids2)
            out, out2 = te(ids, output_hidden_states=True), te2(ids2, output_hidden_states=True)
            assert torch.equal(out.hidden_states[-2], out2.hidden_states[-2])
            assert torch.equal(out[0], out2[0])
            hidden.append(out.hidden_states[-2])
        hidden = torch.cat(hidden, dim=-1)
        x = torch.randn(1, 4, 8, 8, generator=g)
        added = None
        if ref.spec.micro_conditioning:
            pooled = torch.randn(1, ref.unet.config.projection_class_embeddings_input_dim - 6 *
                                 ref.unet.config.addition_time_embed_dim, generator=g)
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]])}
        assert torch.equal(ref.unet(x, 10, hidden, added_cond_kwargs=added).sample,
                           got.unet(x, 10, hidden, added_cond_kwargs=added).sample)
        assert torch.equal(ref.vae.decode(x).sample, got.vae.decode(x).sample)
    assert got.noise_scheduler.config.prediction_type == ref.noise_scheduler.config.prediction_type


def _meta_ldm(arch: str, extra_te_layer: bool = False) -> dict:
    """A real-size LDM/SGM state dict of `arch` on the meta device, written from the public configs."""
    spec = archs.get(arch)
    sd = unet_to_ldm_state(archs.meta_model(arch, spec.denoiser)) | vae_to_ldm_state(archs.meta_model(arch, "vae"))
    for t in spec.text_encoders:
        te = archs.meta_model(arch, t.attr)
        sd |= (openclip_to_ldm_state if t.ldm_layout == "openclip" else clip_to_ldm_state)(te, t.ldm_prefix)
        if extra_te_layer:  # as real SD 2.x files hold it: OpenCLIP-H's 24th layer
            last = te.config.num_hidden_layers - 1
            src = f"{t.ldm_prefix}transformer.resblocks.{last}."
            dst = f"{t.ldm_prefix}transformer.resblocks.{last + 1}."
            sd |= {dst + k[len(src):]: v for k, v in list(sd.items()) if k.startswith(src)}
    return sd


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


# LDM/SGM single-file checkpoints of the UNet families (SD 3.x / FLUX.1 files: tests/test_big_files.py)
LDM_ARCHS = [s.id for s in archs.SPECS.values() if s.denoiser_names != "original"]


@pytest.mark.parametrize("arch", LDM_ARCHS)
def test_derived_configs_of_the_real_architectures_equal_their_public_configs(arch):
    spec = archs.get(arch)
    sd = _meta_ldm(arch, extra_te_layer=any(t.ldm_extra_layer for t in spec.text_encoders))
    assert detect_checkpoint_arch(list(sd)) is spec
    derived = C.derive_configs(sd, spec)  # no metadata: heads by the family's rule, as for any third-party file
    for attr in ("vae", *spec.components.values()):
        public = _config(archs.meta_model(arch, attr))
        for k, v in derived[attr].items():
            if k in public and not k.startswith("_"):
                assert _same(v, public[k]), (attr, k, v, public[k])
    # and the values that came from the tensors, not from the public config, are the interesting ones
    assert derived[spec.denoiser]["block_out_channels"] == list(archs.load_config(arch, "unet")["block_out_channels"])


@pytest.mark.parametrize("key,label", [("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD 3.x"),
                                       ("double_blocks.0.img_attn.qkv.weight", "FLUX.1")])
def test_a_truncated_single_file_transformer_is_refused_in_one_line(tmp_path, key, label):
    """SD 3.x / FLUX.1 single files load (tests/test_big_files.py); one holding a lone block tensor is named as
    incomplete before anything is read."""
    save_file({key: torch.zeros(3, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(SdloraError, match=f"the {re.escape(label)} transformer lacks .*incomplete") as e:
        load_base(str(tmp_path / "dit.safetensors"))
    assert "\n" not in str(e.value)


def test_tiny_widths_without_metadata_are_refused_with_one_line(tmp_path):
    path = _write(load_base("tiny-sd2"), tmp_path / "t.safetensors", metadata=False)
    with pytest.raises(SdloraError, match="attention head") as e:
        load_base(str(path))
    assert "\n" not in str(e.value)


def test_prediction_type_rules(tmp_path):
    spec2, spec1 = archs.get("sd2"), archs.get("sd1")
    key = C._V_HEURISTIC_KEY
    g = torch.Generator().manual_seed(0)
    wide = {key: torch.randn(320, generator=g) * 0.2}
    narrow = {key: torch.randn(320, generator=g) * 0.01}
    assert C.prediction_type(wide, {}, spec2) == "v_prediction"  # ComfyUI's SD 2.x heuristic
    assert C.prediction_type(narrow, {}, spec2) == "epsilon"
    assert C.prediction_type(wide, {}, spec1) == "epsilon"  # SD 1.x: the family's scheduler says
    assert C.prediction_type(narrow | {C.V_PRED_MARKER: torch.tensor([])}, {}, spec2) == "v_prediction"
    assert C.prediction_type(wide, {"modelspec.prediction_type": "epsilon"}, spec2) == "epsilon"
    assert C.prediction_type(wide, {}, spec2, requested="epsilon") == "epsilon"
    # through the loader: the v-prediction tiny model's file says v (marker); the flag overrides it
    path = _write(load_base("tiny-sd2"), tmp_path / "v.safetensors")
    assert load_base(str(path)).prediction_type == "v_prediction"
    assert load_base(str(path), prediction_type="epsilon").noise_scheduler.config.prediction_type == "epsilon"


def test_clip_tokenizer_is_clips(tmp_path, offline):
    tok, open_tok = clip_tokenizer(), clip_tokenizer("!")
    assert len(tok) == VOCAB_SIZE
    # OpenAI CLIP's tokenization of its README example, and the padding of CLIP-L vs OpenCLIP
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A  Photo of a CAT").input_ids == tok("a photo of a cat").input_ids
    assert tok("x", padding="max_length", max_length=5).input_ids[-1] == 49407
    assert open_tok("x", padding="max_length", max_length=5).input_ids[-1] == 0
    # a file whose encoders have CLIP's vocabulary gets CLIP's tokenizers, each with its padding
    base = load_base("tiny-sdxl")
    sd = ldm_state_dict(base)
    g = torch.Generator().manual_seed(1)
    for t in base.spec.text_encoders:
        key = (t.ldm_prefix + "token_embedding.weight" if t.ldm_layout == "openclip"
               else t.ldm_prefix + "text_model.embeddings.token_embedding.weight")
        sd[key] = torch.randn(VOCAB_SIZE, sd[key].shape[1], generator=g)
    got = load_base(str(_write(base, tmp_path / "clip.safetensors", sd=sd)))
    assert got.tokenizer.pad_token == "<|endoftext|>" and got.tokenizer_2.pad_token == "!"
    assert got.tokenizer_2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert got.text_encoder_2.config.vocab_size == VOCAB_SIZE


def test_incomplete_checkpoint_is_one_line(tmp_path):
    base = load_base("tiny")
    sd = {k: v for k, v in ldm_state_dict(base).items() if not k.startswith(C.VAE)}
    with pytest.raises(SdloraError, match="VAE") as e:
        load_base(str(_write(base, tmp_path / "novae.safetensors", sd=sd)))
    assert "\n" not in str(e.value)
    sd = ldm_state_dict(base)
    sd.pop(next(k for k in sd if k.startswith("model.diffusion_model.output_blocks.")))
    with pytest.raises(SdloraError, match="UNet") as e:
        load_base(str(_write(base, tmp_path / "cut.safetensors", sd=sd)))


@pytest.mark.slow
def test_training_on_a_single_file_checkpoint_offline(tmp_path, offline):
    from sdlora.formats.file_io import load
    from tests.helpers import train_tiny

    path = _write(load_base("tiny-sd2"), tmp_path / "sd2-v.safetensors")
    res = train_tiny(tmp_path / "a.safetensors", model=str(path), steps=1, resolution=64, no_cache=True)
    _, md = load(res.path)
    assert res.base.prediction_type == "v_prediction" and md["ss_base_model_version"] == "sd_v2_768_v"
    res = train_tiny(tmp_path / "e.safetensors", model=str(path), steps=1, resolution=64, no_cache=True,
                     prediction_type="epsilon")
    assert res.base.prediction_type == "epsilon"
    assert load(res.path)[1]["ss_base_model_version"] == "sd_v2_512"


def test_file_variants_as_found_in_the_wild(tmp_path, offline):
    """fp16 tensors, a CLIP without the `text_model.` level (older files), position ids and schedule buffers."""
    ref = load_base("tiny")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ldm_state_dict(ref).items()}
    te = ref.spec.text_encoders[0].ldm_prefix
    sd = {k.replace(te + "text_model.", te): v for k, v in sd.items()}
    sd[te + "embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    got = load_base(str(_write(ref, tmp_path / "wild.safetensors", sd=sd)))
    assert got.unet.dtype == torch.float32 and got.text_encoder.dtype == torch.float32
    for attr, module in ref.modules.items():
        mine, theirs = got.modules[attr].state_dict(), module.state_dict()
        assert all(torch.equal(mine[k], theirs[k].half().float())
                   for k in theirs if theirs[k].is_floating_point()), attr
    assert load_base(str(tmp_path / "wild.safetensors"), dtype=torch.bfloat16).unet.dtype == torch.bfloat16
