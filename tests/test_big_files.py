"""FLUX.1 and SD 3.5 from the files people keep, loaded piece by piece (sdlora/bigload.py, sdlora/stream.py).

The tiny models are written as BFL / SAI single files (the transformer in the original layout through
`formats.dit.original_modules`, with the non-Linear tensors named as diffusers' converters read them — the table
in tests/test_dit_names.py), their CLIP / T5 / VAE in the separate files ComfyUI keeps or embedded under SAI's
prefixes; loading must give back tensors `torch.equal` to the model they were written from. The transformer map
(`dit.tensor_sources`) is checked against diffusers' own single-file converters on the real-size key sets, by
running each converter on tensors holding their own row numbers. Variant detection runs on real-size meta models.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import save_file

from sdlora import archs, quant
from sdlora.bigload import LoadOptions, check_host_memory, file_components
from sdlora.errors import SdloraError
from sdlora.formats import bigfiles, dit
from sdlora.formats.checkpoint import META_PREFIX
from sdlora.merge import vae_to_ldm_state
from sdlora.models import load_base
from tests.test_dit_names import FLUX_PASSTHROUGH, SD3_PASSTHROUGH

PASSTHROUGH = {"flux": FLUX_PASSTHROUGH, "sd3": SD3_PASSTHROUGH}


def original_transformer(arch: str, model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The BFL / SAI state dict of a diffusers transformer."""
    mods = dict(model.named_modules())
    out = {}
    for original, parts in dit.original_modules(arch, model).items():
        for attr in ("weight", "bias"):
            out[f"{prefix}{original}.{attr}"] = torch.cat(
                [getattr(mods[path], attr)[a:b] for path, a, b in parts]).clone()
    for name, tensor in model.state_dict().items():
        for rx, template in PASSTHROUGH[arch]:
            m = re.fullmatch(rx, name)
            if m:
                out[prefix + m.expand(template)] = tensor.clone()
    return out


def hf_state(module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers model in its own layout (CLIP with the `text_model.` level ComfyUI's files have)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if type(module).__name__ == "CLIPTextModel":
            k = "text_model." + k
        out[prefix + k] = v.clone()
    return out


def _md(base, attrs) -> dict[str, str]:
    """The config values the tiny tensors cannot show (heads, rotary axes, sample size) as sdlora's metadata."""
    import json

    out = {}
    for a in attrs:
        cfg = base.modules[a].config
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        keep = {"transformer": ("axes_dims_rope", "attention_head_dim", "sample_size", "pos_embed_max_size"),
                "vae": ("norm_num_groups", "sample_size", "scaling_factor", "shift_factor")}.get(
            a, ("num_attention_heads", "num_heads", "hidden_act", "projection_dim", "layer_norm_eps"))
        out[META_PREFIX + a] = json.dumps({k: cfg[k] for k in keep if k in cfg})
    return out


def write_flux(base, folder, embedded: bool = False, prefix: str = ""):
    """`flux1-dev.safetensors` (BFL layout), `clip_l`, `t5xxl`, `ae` beside it; or all in one file (`embedded`)."""
    main = original_transformer("flux", base.transformer, prefix)
    te, t5 = hf_state(base.text_encoder, ""), hf_state(base.text_encoder_2, "")
    ae = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm_state(base.vae).items()}
    md = _md(base, ["transformer", "text_encoder", "text_encoder_2", "vae"])
    path = folder / "flux1.safetensors"
    if embedded:
        main |= {"text_encoders.clip_l.transformer." + k: v for k, v in te.items()}
        main |= {"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()}
        main |= {"first_stage_model." + k: v for k, v in ae.items()}
        save_file(main, str(path), md)
        return path, {}
    save_file(main, str(path), md)
    parts = {"clip_l": folder / "clip_l.safetensors", "t5xxl": folder / "t5xxl.safetensors",
             "ae": folder / "ae.safetensors"}
    save_file(te, str(parts["clip_l"]), md)
    save_file(t5, str(parts["t5xxl"]), md)
    save_file(ae, str(parts["ae"]), md)
    return path, {k: str(v) for k, v in parts.items()}


def write_sd3(base, folder, embedded: bool = True):
    """`sd3.5.safetensors` (SAI layout, `model.diffusion_model.`), CLIP-L, bigG, T5 and VAE embedded or beside."""
    main = original_transformer("sd3", base.transformer, "model.diffusion_model.")
    parts = {"clip_l": hf_state(base.text_encoder, ""), "clip_g": hf_state(base.text_encoder_2, ""),
             "t5xxl": hf_state(base.text_encoder_3, "")}
    md = _md(base, ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"])
    path = folder / "sd3.5.safetensors"
    main |= vae_to_ldm_state(base.vae)
    if embedded:
        for role, sd in parts.items():
            main |= {f"text_encoders.{role}.transformer.{k}": v for k, v in sd.items()}
        save_file(main, str(path), md)
        return path, {}
    save_file(main, str(path), md)
    out = {}
    for role, sd in parts.items():
        out[role] = str(folder / f"{role}.safetensors")
        save_file(sd, out[role], md)
    return path, out


def assert_same_model(a, b):
    for attr, m in a.modules.items():
        own, got = m.state_dict(), b.modules[attr].state_dict()
        assert set(own) == set(got), (attr, sorted(set(own) ^ set(got))[:5])
        for k, v in own.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (attr, k)
        assert type(b.modules[attr]) is type(m)
        if attr in ("transformer", "vae"):  # diffusers configs: every value (tuples and lists alike)
            def norm(c):
                return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(c).items() if not k.startswith("_")}
            assert norm(m.config) == norm(b.modules[attr].config), attr


def test_tiny_flux_single_file_with_parts_loads_exactly(tmp_path):
    base = load_base("tiny-flux")
    path, parts = write_flux(base, tmp_path)
    got = load_base(str(path), options=LoadOptions(**parts))
    assert_same_model(base, got)
    assert got.variant == "dev" and got.spec.text_encoders[1].max_length == 512


@pytest.mark.slow
def test_tiny_flux_single_file_trains_with_t5_before_the_transformer(tmp_path):
    """`sdlora train` in-process on the BFL file: T5's outputs are cached and T5 released before the transformer
    is read (the deferred denoiser), 2 steps, a kohya FLUX file that verifies."""
    from sdlora.config import make_config
    from sdlora.train.loop import train
    from tests.helpers import DOG

    path, parts = write_flux(load_base("tiny-flux"), tmp_path)
    seen = []
    result = train(make_config(dict(images=str(DOG), prompt="sks dog", model=str(path), steps=2, lr=1e-3,
                                    out=str(tmp_path / "a.safetensors"), resolution=64, no_cache=True,
                                    t5xxl_max_token_length=16, **parts)), log=seen.append)
    assert result.path.is_file() and result.steps == 2
    first = next(line for line in seen if line.startswith("text: "))
    assert "text_encoder_2 left memory before the transformer loads" in first  # T5 gone, CLIP-L trains
    assert seen.index(first) < next(i for i, line in enumerate(seen) if line.startswith("model "))
    assert result.model.spec.text_encoders[1].max_length == 16
    from safetensors import safe_open

    with safe_open(str(result.path), "pt") as f:
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in f.keys())


@pytest.mark.slow
@pytest.mark.parametrize("mode,mixed", [("fp8", "no"), ("nf4", "no"), ("fp8", "bf16")])
def test_tiny_flux_single_file_trains_on_a_quantised_base_computing_in_the_run_dtype(tmp_path, mode, mixed):
    """Quantised layers compute in --mixed-precision's dtype (fp32 with "no"), and the weights quantisation left
    alone (norms, embedders) are in that dtype too: an fp8 CLIP layer's fp32 output meets an fp32 LayerNorm."""
    from sdlora.config import make_config
    from sdlora.train.loop import train
    from tests.helpers import DOG

    path, parts = write_flux(load_base("tiny-flux"), tmp_path)
    result = train(make_config(dict(images=str(DOG), prompt="sks dog", model=str(path), steps=1, lr=1e-3,
                                    out=str(tmp_path / "a.safetensors"), resolution=64, no_cache=True,
                                    base_precision=mode, te_precision=mode, mixed_precision=mixed,
                                    no_text_encoder=True, t5xxl_max_token_length=16, **parts)), log=lambda s: None)
    assert result.path.is_file() and torch.isfinite(torch.tensor(result.loss_after))
    compute = torch.float32 if mixed == "no" else torch.bfloat16
    den = result.model.denoiser
    assert {m.compute_dtype for m in den.modules() if quant.stored(m)} == {compute}


@pytest.mark.slow
def test_tiny_flux_schnell_and_embedded_parts(tmp_path):
    """A schnell-shaped file (no guidance_in) with CLIP-L, T5 and the VAE embedded under ComfyUI's prefixes and the
    transformer under `model.diffusion_model.`: detected as schnell, T5 at 256 tokens, every tensor exact."""
    from sdlora.tiny import tiny_components

    spec = archs.get("flux")
    parts = tiny_components(spec)
    cfg = dict(parts["transformer"].config) | {"guidance_embeds": False}
    torch.manual_seed(1)
    parts["transformer"] = archs.build({k: v for k, v in cfg.items() if not k.startswith("_")}
                                       | {"_class_name": "FluxTransformer2DModel"}).eval()
    from sdlora.models import from_components

    base = from_components("schnell", spec, parts, 64)
    path, _ = write_flux(base, tmp_path, embedded=True, prefix="model.diffusion_model.")
    got = load_base(str(path))
    assert_same_model(base, got)
    assert got.variant == "schnell" and got.spec.text_encoders[1].max_length == 256


@pytest.mark.slow
@pytest.mark.parametrize("embedded", [True, False], ids=["embedded", "separate"])
def test_tiny_sd35_medium_file_loads_exactly(tmp_path, embedded):
    base = load_base("tiny-sd3")
    path, parts = write_sd3(base, tmp_path, embedded)
    got = load_base(str(path), options=LoadOptions(**parts))
    assert_same_model(base, got)
    assert got.variant == "5-medium"


def test_tiny_sd35_large_shaped_file_loads_exactly(tmp_path):
    """SD 3.5 Large's tree (no dual attention, qk-norm) at toy widths."""
    from sdlora.models import from_components
    from sdlora.tiny import tiny_components

    spec = archs.get("sd3")
    parts = tiny_components(spec)
    cfg = {k: v for k, v in dict(parts["transformer"].config).items() if not k.startswith("_")}
    cfg |= {"dual_attention_layers": (), "num_layers": 5, "_class_name": "SD3Transformer2DModel"}
    torch.manual_seed(2)
    parts["transformer"] = archs.build(cfg).eval()
    base = from_components("large", spec, parts, 64)
    path, _ = write_sd3(base, tmp_path)
    got = load_base(str(path))
    assert_same_model(base, got)
    assert got.variant == "5-large"


def test_a_missing_part_is_named_with_its_flag(tmp_path):
    path, parts = write_flux(load_base("tiny-flux"), tmp_path)
    with pytest.raises(SdloraError) as e:
        load_base(str(path), options=LoadOptions(ae=parts["ae"]))
    assert str(e.value) == ("flux1.safetensors has no clip_l, t5xxl weights; pass --clip-l clip_l.safetensors and "
                            "--t5xxl t5xxl_fp16.safetensors")
    with pytest.raises(SdloraError, match=r"clip_l.safetensors \(given with --t5xxl\) holds no t5xxl weights") as e:
        load_base(str(path), options=LoadOptions(clip_l=parts["clip_l"], t5xxl=parts["clip_l"], ae=parts["ae"]))
    assert "\n" not in str(e.value)


def test_a_t5_of_another_width_is_refused_before_loading(tmp_path):
    """A T5 file whose width is not the transformer's text input: one line, before any weight is read."""
    base = load_base("tiny-flux")
    path, parts = write_flux(base, tmp_path)
    from sdlora.tiny import _te, tiny_tokenizer

    other = _te("flux", "text_encoder_2", tiny_tokenizer(), "t5")
    other = archs.build(dict(other.config.to_dict()) | {"d_model": 48, "architectures": ["T5EncoderModel"]})
    save_file(hf_state(other, ""), str(tmp_path / "t5_base.safetensors"))
    with pytest.raises(SdloraError) as e:
        load_base(str(path), options=LoadOptions(**parts | {"t5xxl": str(tmp_path / "t5_base.safetensors")}))
    assert str(e.value) == ("t5_base.safetensors: a T5 encoder 48 wide; FLUX.1 dev takes T5-XXL (32 wide); pass the "
                            "t5xxl file with --t5xxl")


# ---------------------------------------------------------------- real sizes, on the meta device

REAL = [("flux", ""), ("flux", "schnell"), ("sd3", "large"), ("sd3", "")]


def _real_original_shapes(arch: str, variant: str) -> tuple[torch.nn.Module, dict[str, tuple]]:
    """The real-size meta transformer and the shapes of its original-layout file, per `dit.tensor_sources`."""
    model = archs.meta_model(arch, "transformer", variant)
    shapes = {n: tuple(p.shape) for n, p in [*model.named_parameters(), *model.named_buffers()]}
    rows: dict[str, tuple] = {}
    for name, pieces in dit.tensor_sources(arch, model).items():
        for orig, a, b in pieces:
            n = shapes[name][0] if a is None else b
            rows[orig] = (max(n, rows.get(orig, (0,))[0]), *shapes[name][1:])
    return model, rows


@pytest.mark.parametrize("arch,variant", REAL, ids=["flux-dev", "flux-schnell", "sd35-large", "sd35-medium"])
def test_tensor_sources_agree_with_diffusers_converters_at_real_size(arch, variant):
    """Each original tensor becomes a 1-D tensor of its own row numbers (tensor id << 20 | row); diffusers'
    converter renames, splits, concatenates and swaps them as it would the weights; every diffusers tensor must
    then hold exactly the rows `tensor_sources` says, in its order, and the converter must consume every tensor."""
    model, rows = _real_original_shapes(arch, variant)
    names = sorted(rows)
    ckpt = {k: (i << 20) + torch.arange(rows[k][0], dtype=torch.int64) for i, k in enumerate(names)}
    convert = {"flux": sfu.convert_flux_transformer_checkpoint_to_diffusers,
               "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers}[arch]
    table = None
    if arch == "sd3":  # the positional table is renamed whole (the converter reads no shape of it)
        table = ckpt["pos_embed"]
    converted = convert(ckpt)
    assert ckpt == {}, sorted(ckpt)[:5]  # every original tensor consumed
    sources = dit.tensor_sources(arch, model)
    assert set(sources) == set(converted)
    for name, pieces in sources.items():
        if name == "pos_embed.pos_embed":
            assert pieces == (("pos_embed", None, None),) and converted[name] is table
            continue
        expect = torch.cat([(names.index(k) << 20) + torch.arange(a or 0, b if b is not None else rows[k][0])
                            for k, a, b in pieces])
        assert torch.equal(converted[name], expect), name


@pytest.mark.parametrize("arch,variant", REAL, ids=["flux-dev", "flux-schnell", "sd35-large", "sd35-medium"])
def test_variant_and_config_come_from_real_size_tensor_shapes(arch, variant):
    _, rows = _real_original_shapes(arch, variant)
    prefix = "model.diffusion_model." if arch == "sd3" else ""
    shapes = {prefix + k: v for k, v in rows.items()}
    assert bigfiles.denoiser_family(shapes) == (arch, prefix)
    derived = bigfiles.denoiser_config(arch, shapes, prefix)
    public = archs.load_config(arch, "transformer" + (f"_{variant}" if variant else ""))
    for k, v in public.items():
        assert derived[k] == v or (isinstance(v, list) and list(derived[k]) == v), (k, derived[k], v)
    spec = archs.get(arch)
    expect = {("flux", ""): "dev", ("flux", "schnell"): "schnell", ("sd3", "large"): "5-large",
              ("sd3", ""): "5-medium"}[arch, variant]
    assert spec.variant(derived, "flow") == expect


# ---------------------------------------------------------------- folders, memory


@pytest.mark.slow
def test_sharded_diffusers_folder_loads_piece_by_piece_exactly(tmp_path):
    base = load_base("tiny-flux")
    base.pipeline().save_pretrained(tmp_path / "flux", max_shard_size="300KB")
    assert len(list((tmp_path / "flux" / "transformer").glob("*.safetensors"))) > 2  # really sharded
    got = load_base(str(tmp_path / "flux"))
    assert got.loaders  # loaded by sdlora/bigload.py, not diffusers' from_pretrained
    assert_same_model(base, got)


def test_the_transformer_is_read_one_block_at_a_time(tmp_path):
    """Counted materialised bytes: the unquantised weights held at once are one block's, not the model's."""
    base = load_base("tiny-flux")
    path, parts = write_flux(base, tmp_path)
    _, comps = file_components(path, "flux", "", LoadOptions(**parts))
    counter = {}
    model = comps["transformer"].build(counter)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    biggest = max(sum(p.numel() * p.element_size() for p in b.parameters())
                  for b in [*model.transformer_blocks, *model.single_transformer_blocks])
    assert counter["peak"] == biggest < total / 10


def test_a_model_too_big_for_host_memory_is_refused_naming_what_fits():
    """The real-size FLUX.1-dev at bf16 against 16 GB (this 24 GB machine's usual free memory): refused from the
    planned sizes alone, naming a precision plan that fits; that plan passes the same check."""
    from sdlora.bigload import Component
    from sdlora.stream import Files

    spec = archs.get("flux")
    comps = {a: Component(a, archs.load_config("flux", a), Files(), {}, "bf16", a)
             for a in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    opts = LoadOptions(base_precision="bf16", te_precision="bf16", defer_denoiser=True)
    with pytest.raises(SdloraError) as e:
        check_host_memory(spec, comps, opts, "flux-dev", available=16 * 10**9)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("flux-dev needs about 25.") and "transformer 23.8 GB" in msg
    m = re.search(r"; --base-precision (\S+) --te-precision (\S+) needs about ([\d.]+) GB", msg)
    assert m and m[1] == "fp8", msg
    sizes = check_host_memory(spec, comps, LoadOptions(base_precision=m[1], te_precision=m[2], defer_denoiser=True),
                              "flux-dev", available=16 * 10**9)
    assert 11.5e9 < sizes["transformer"] < 12.5e9


@pytest.mark.slow
def test_generate_and_merge_take_a_flux_single_file_with_train_s_part_flags(tmp_path, capsys):
    """`sdlora generate` / `sdlora merge` on a BFL single file with --clip-l, --t5xxl, --ae (train's flags, the same
    loading code): the image equals the built-in model's (the same weights), the merged folder holds the weights
    merging onto the built-in model gives; a missing part is one line naming its flag, before anything loads."""
    from PIL import Image

    from sdlora.cli import main
    from sdlora.formats import kohya, layouts
    from tests.helpers import kohya_fixture

    base = load_base("tiny-flux")
    path, parts = write_flux(base, tmp_path)
    flags = [x for role, f in parts.items() for x in (f"--{role.replace('_', '-')}", f)]
    gen = ["generate", "--prompt", "sks dog", "--steps", "2", "--size", "64", "--seed", "3"]
    assert main([*gen, "--model", "tiny-flux", "--out", str(tmp_path / "builtin.png")]) == 0
    assert main([*gen, "--model", str(path), *flags, "--out", str(tmp_path / "file.png")]) == 0
    with Image.open(tmp_path / "builtin.png") as a, Image.open(tmp_path / "file.png") as b:
        assert a.tobytes() == b.tobytes()
    # on a quantised base (computing in fp32, as the VAE does): the same picture up to the weights' rounding
    assert main([*gen, "--model", str(path), *flags, "--base-precision", "fp8", "--te-precision", "fp8",
                 "--out", str(tmp_path / "fp8.png")]) == 0
    import numpy as np

    with Image.open(tmp_path / "builtin.png") as a, Image.open(tmp_path / "fp8.png") as b:
        diff = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32))
    print("fp8 vs full: mean abs pixel difference", diff.mean())
    assert 0 < diff.mean() < 8
    capsys.readouterr()
    assert main([*gen, "--model", str(path), "--clip-l", parts["clip_l"], "--ae", parts["ae"],
                 "--out", str(tmp_path / "none.png")]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sdlora: error:")]
    assert len(errors) == 1 and "--t5xxl" in errors[0] and not (tmp_path / "none.png").exists()

    table = layouts.table_of(base.components, base.arch)
    lora = kohya.save(kohya_fixture(table, r"^lora_unet_double_blocks_0_img_attn"), tmp_path / "l.safetensors", {})
    assert main(["merge", "--model", "tiny-flux", "--lora", str(lora), "--out", str(tmp_path / "m1")]) == 0
    assert main(["merge", "--model", str(path), *flags, "--lora", str(lora), "--out", str(tmp_path / "m2")]) == 0
    assert_same_model(load_base(str(tmp_path / "m1")), load_base(str(tmp_path / "m2")))
    capsys.readouterr()
    assert main(["merge", "--model", str(path), "--t5xxl", parts["t5xxl"], "--ae", parts["ae"], "--lora", str(lora),
                 "--out", str(tmp_path / "m3")]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sdlora: error:")]
    assert len(errors) == 1 and "--clip-l" in errors[0] and not (tmp_path / "m3").exists()


@pytest.mark.slow
def test_comfyui_check_maps_the_blocks_of_the_loaded_model_not_the_reference_one():
    """verify's ComfyUI check takes the loaded model's modules: SD 3.5 Large has 38 joint blocks, the reference
    SD 3.5 Medium 24 (a full-size Large run's file was refused for 'lora key not loaded' on blocks 23-37)."""
    from accelerate import init_empty_weights

    from sdlora.archs.spec import DENOISER
    from sdlora.formats import layouts

    with init_empty_weights():
        large = archs.build(archs.load_config("sd3", "transformer_large"))
    keys = layouts.comfy_keys_of(layouts.table_of({DENOISER: large}, "sd3"), "sd3")
    last = "lora_unet_joint_blocks_37_x_block_attn_qkv"
    assert last in keys and "lora_unet_joint_blocks_23_context_block_attn_proj" in keys
    assert last not in layouts.comfy_keys("sd3")
