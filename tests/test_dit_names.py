"""sdlora.formats.dit against an independent reference: diffusers' single-file converters.

For small random FLUX / SD3 models with the real block structure, an ORIGINAL (BFL / SAI) checkpoint is built from
the diffusers model's own weights through the map under test (fused rows concatenated in the map's order, swapped
halves in the map's order), diffusers' `convert_*_transformer_checkpoint_to_diffusers` turns it back into diffusers
names, and every tensor must come back exactly. Then the real sizes on the meta device: kohya's module names,
counts and shapes (docs/lycoris-and-dit.md §7.1/§7.2).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders import single_file_utils as sfu

from sdlora.formats.dit import original_modules


def diffusers_to_original(arch: str, model) -> dict[str, tuple[str, int, int]]:
    """The inverse of `original_modules` (what these tests check it against; sdlora writes and reads through
    `original_modules` itself): diffusers module path -> (original module path, row start, row stop in the
    original weight).

    A module whose halves are swapped (see original_modules) maps to the whole original weight, rows 0..n: its
    rows are those of the original but in (scale, shift) order -- write and read such modules via
    original_modules, which lists the halves in order."""
    out = {}
    for original, parts in original_modules(arch, model).items():
        offset = 0
        for path, start, stop in parts:
            if path in out:  # second half of a swapped module: widen to the whole original weight
                out[path] = (original, 0, offset + stop - start)
            else:
                out[path] = (original, offset, offset + stop - start)
            offset += stop - start
    return out


# Non-Linear tensors the converters also read (norm scales, the positional table), diffusers name -> original name,
# copied from the converters' source. Not part of the map under test; only so that the converter runs to the end.
FLUX_PASSTHROUGH = [
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]
SD3_PASSTHROUGH = [
    (r"pos_embed\.pos_embed", "pos_embed"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
]

TOY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
TOY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
               pos_embed_max_size=8)
TOY_SD3_VARIANTS = {
    "sd3-medium": dict(TOY_SD3),  # SD3 Medium: no qk-norm, no dual attention
    "sd3.5-large": dict(TOY_SD3, qk_norm="rms_norm"),
    "sd3.5-medium": dict(TOY_SD3, qk_norm="rms_norm", dual_attention_layers=(0,)),
}

FLUX_DEV = dict(attention_head_dim=128, num_attention_heads=24, num_layers=19, num_single_layers=38, in_channels=64,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56], patch_size=1)
SD35_LARGE = dict(attention_head_dim=64, num_attention_heads=38, num_layers=38, caption_projection_dim=2432,
                  joint_attention_dim=4096, pooled_projection_dim=2048, in_channels=16, out_channels=16,
                  patch_size=2, pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)
SD35_MEDIUM = dict(SD35_LARGE, num_attention_heads=24, num_layers=24, caption_projection_dim=1536,
                   dual_attention_layers=tuple(range(13)), pos_embed_max_size=384)


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and distinct (no zero-initialised layer can hide a wrong row order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _original_checkpoint(arch: str, model: torch.nn.Module, passthrough) -> dict[str, torch.Tensor]:
    """An original-layout state dict built from `model`'s own weights through original_modules."""
    mods = dict(model.named_modules())
    ckpt = {}
    for original, parts in original_modules(arch, model).items():
        for attr in ("weight", "bias"):
            ckpt[f"{original}.{attr}"] = torch.cat(
                [getattr(mods[path], attr)[start:stop] for path, start, stop in parts]).clone()
    for name, tensor in model.state_dict().items():
        for rx, template in passthrough:
            m = re.fullmatch(rx, name)
            if m:
                ckpt[m.expand(template)] = tensor.clone()
    return ckpt


class _TorchWithFluxWidth:
    """`torch` as the FLUX converter sees it, except that its split of `linear1` by the hard-coded FLUX.1 width
    (3072, 3072, 3072, 12288) uses the toy model's width (inner, inner, inner, 4·inner) instead."""

    def __init__(self, inner: int):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(torch, name)

    def split(self, tensor, split_size, dim=0):
        if tuple(split_size) == (3072, 3072, 3072, 12288):
            split_size = (self.inner,) * 3 + (4 * self.inner,)
        return torch.split(tensor, split_size, dim)


def _check_round_trip(arch, model, ckpt, converted):
    assert ckpt == {}, f"original keys the converter did not consume: {sorted(ckpt)}"
    own = model.state_dict()
    assert set(converted) == set(own), (sorted(set(own) - set(converted)), sorted(set(converted) - set(own)))
    for name, tensor in own.items():
        assert converted[name].shape == tensor.shape, name
        assert torch.equal(converted[name], tensor), name


def _check_covers_every_layer(arch, model):
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    inverse = diffusers_to_original(arch, model)
    assert set(inverse) == layers
    table = original_modules(arch, model)
    # every diffusers layer's rows are covered exactly once (twice-listed swapped layers: one half each)
    rows = {}
    for parts in table.values():
        for path, start, stop in parts:
            rows.setdefault(path, []).append((start, stop))
    mods = dict(model.named_modules())
    for path, spans in rows.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == mods[path].weight.shape[0], path
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), path
    # the inverse's ranges tile each original weight
    for original, parts in table.items():
        total = sum(stop - start for _, start, stop in parts)
        spans = sorted({inverse[path][1:] for path, _, _ in parts})
        assert all(inverse[path][0] == original for path, _, _ in parts)
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), original


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_map_round_trips_through_diffusers_converter(guidance, monkeypatch):
    model = _random(FluxTransformer2DModel(**TOY_FLUX, guidance_embeds=guidance))
    _check_covers_every_layer("flux", model)
    ckpt = _original_checkpoint("flux", model, FLUX_PASSTHROUGH)
    assert any(k.startswith("guidance_in.") for k in ckpt) == guidance
    monkeypatch.setattr(sfu, "torch", _TorchWithFluxWidth(TOY_FLUX["num_attention_heads"]
                                                          * TOY_FLUX["attention_head_dim"]))
    converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(ckpt)
    _check_round_trip("flux", model, ckpt, converted)


@pytest.mark.parametrize("variant", TOY_SD3_VARIANTS)
def test_sd3_map_round_trips_through_diffusers_converter(variant):
    model = _random(SD3Transformer2DModel(**TOY_SD3_VARIANTS[variant]))
    _check_covers_every_layer("sd3", model)
    ckpt = _original_checkpoint("sd3", model, SD3_PASSTHROUGH)
    # with the `model.diffusion_model.` prefix of a full single-file checkpoint, which the converter strips
    ckpt = {f"model.diffusion_model.{k}": v for k, v in ckpt.items()}
    converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    _check_round_trip("sd3", model, ckpt, converted)


def test_swapped_halves_are_listed_in_original_order():
    flux = FluxTransformer2DModel(**TOY_FLUX, guidance_embeds=False)
    inner = TOY_FLUX["num_attention_heads"] * TOY_FLUX["attention_head_dim"]
    table = original_modules("flux", flux)
    assert table["final_layer.adaLN_modulation.1"] == (("norm_out.linear", inner, 2 * inner),
                                                       ("norm_out.linear", 0, inner))
    assert table["single_blocks.1.linear1"] == (
        ("single_transformer_blocks.1.attn.to_q", 0, inner), ("single_transformer_blocks.1.attn.to_k", 0, inner),
        ("single_transformer_blocks.1.attn.to_v", 0, inner), ("single_transformer_blocks.1.proj_mlp", 0, 4 * inner))
    inverse = diffusers_to_original("flux", flux)
    assert inverse["single_transformer_blocks.1.proj_mlp"] == ("single_blocks.1.linear1", 3 * inner, 7 * inner)
    assert inverse["norm_out.linear"] == ("final_layer.adaLN_modulation.1", 0, 2 * inner)
    sd3 = SD3Transformer2DModel(**TOY_SD3_VARIANTS["sd3.5-medium"])
    table = original_modules("sd3", sd3)
    last = TOY_SD3["num_layers"] - 1
    assert table[f"joint_blocks.{last}.context_block.adaLN_modulation.1"] == (
        (f"transformer_blocks.{last}.norm1_context.linear", inner, 2 * inner),
        (f"transformer_blocks.{last}.norm1_context.linear", 0, inner))
    assert table["joint_blocks.0.context_block.adaLN_modulation.1"] == (
        ("transformer_blocks.0.norm1_context.linear", 0, 6 * inner),)
    assert table["joint_blocks.0.x_block.adaLN_modulation.1"] == (("transformer_blocks.0.norm1.linear", 0, 9 * inner),)


def test_unknown_arch_and_unknown_layer_are_refused():
    flux = FluxTransformer2DModel(**TOY_FLUX, guidance_embeds=False)
    with pytest.raises(ValueError, match="arch"):
        original_modules("sdxl", flux)
    flux.extra_head = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra_head"):
        original_modules("flux", flux)


# --- real sizes, on the meta device -----------------------------------------------------------------------------

def _kohya_shapes(arch: str, model) -> dict[str, tuple[int, ...]]:
    """kohya module name -> original weight shape (fused rows summed; in-features from the diffusers layer)."""
    mods = dict(model.named_modules())
    out = {}
    for original, parts in original_modules(arch, model).items():
        weight = mods[parts[0][0]].weight
        assert all(tuple(mods[p].weight.shape[1:]) == tuple(weight.shape[1:]) for p, _, _ in parts), original
        rows = sum(stop - start for _, start, stop in parts)
        out["lora_unet_" + original.replace(".", "_")] = (rows, *weight.shape[1:])
    return out


def _meta(cls, config):
    with torch.device("meta"):
        return cls.from_config(config)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux1_real_sizes_kohya_names_and_shapes(guidance):
    model = _meta(FluxTransformer2DModel, dict(FLUX_DEV, guidance_embeds=guidance))
    shapes = _kohya_shapes("flux", model)
    blocks = {k: v for k, v in shapes.items() if re.match(r"lora_unet_(double|single)_blocks_", k)}
    assert len(blocks) == 19 * 10 + 38 * 3 == 304
    for i in range(19):
        for s in ("img", "txt"):
            assert blocks[f"lora_unet_double_blocks_{i}_{s}_attn_qkv"] == (9216, 3072)
            assert blocks[f"lora_unet_double_blocks_{i}_{s}_attn_proj"] == (3072, 3072)
            assert blocks[f"lora_unet_double_blocks_{i}_{s}_mlp_0"] == (12288, 3072)
            assert blocks[f"lora_unet_double_blocks_{i}_{s}_mlp_2"] == (3072, 12288)
            assert blocks[f"lora_unet_double_blocks_{i}_{s}_mod_lin"] == (18432, 3072)
    for i in range(38):
        assert blocks[f"lora_unet_single_blocks_{i}_linear1"] == (21504, 3072)
        assert blocks[f"lora_unet_single_blocks_{i}_linear2"] == (3072, 15360)
        assert blocks[f"lora_unet_single_blocks_{i}_modulation_lin"] == (9216, 3072)
    # kohya's optional in_dims / final-layer modules
    rest = {k: v for k, v in shapes.items() if k not in blocks}
    expected = {"lora_unet_img_in": (3072, 64), "lora_unet_txt_in": (3072, 4096),
                "lora_unet_time_in_in_layer": (3072, 256), "lora_unet_time_in_out_layer": (3072, 3072),
                "lora_unet_vector_in_in_layer": (3072, 768), "lora_unet_vector_in_out_layer": (3072, 3072),
                "lora_unet_final_layer_linear": (64, 3072), "lora_unet_final_layer_adaLN_modulation_1": (6144, 3072)}
    if guidance:
        expected.update({"lora_unet_guidance_in_in_layer": (3072, 256),
                         "lora_unet_guidance_in_out_layer": (3072, 3072)})
    assert rest == expected


@pytest.mark.parametrize("name", ["large", "medium"])
def test_sd35_real_sizes_kohya_names_and_shapes(name):
    config = SD35_LARGE if name == "large" else SD35_MEDIUM
    model = _meta(SD3Transformer2DModel, config)
    hidden, n = config["caption_projection_dim"], config["num_layers"]
    shapes = _kohya_shapes("sd3", model)
    blocks = {k: v for k, v in shapes.items() if k.startswith("lora_unet_joint_blocks_")}
    dual = set(config.get("dual_attention_layers", ()))
    assert len(blocks) == n * 10 - 3 + 2 * len(dual)
    for i in range(n):
        for s in ("x_block", "context_block"):
            p = f"lora_unet_joint_blocks_{i}_{s}"
            assert blocks[f"{p}_attn_qkv"] == (3 * hidden, hidden)
            if s == "context_block" and i == n - 1:  # pre-only
                assert f"{p}_attn_proj" not in blocks and f"{p}_mlp_fc1" not in blocks
                assert f"{p}_mlp_fc2" not in blocks
                assert blocks[f"{p}_adaLN_modulation_1"] == (2 * hidden, hidden)
                continue
            assert blocks[f"{p}_attn_proj"] == (hidden, hidden)
            assert blocks[f"{p}_mlp_fc1"] == (4 * hidden, hidden)
            assert blocks[f"{p}_mlp_fc2"] == (hidden, 4 * hidden)
            mod = 9 if s == "x_block" and i in dual else 6
            assert blocks[f"{p}_adaLN_modulation_1"] == (mod * hidden, hidden)
        p = f"lora_unet_joint_blocks_{i}_x_block"
        if i in dual:
            assert blocks[f"{p}_attn2_qkv"] == (3 * hidden, hidden)
            assert blocks[f"{p}_attn2_proj"] == (hidden, hidden)
        else:
            assert f"{p}_attn2_qkv" not in blocks and f"{p}_attn2_proj" not in blocks
    if name == "medium":
        assert dual == set(range(13))
    rest = {k: v for k, v in shapes.items() if k not in blocks}
    assert rest == {"lora_unet_x_embedder_proj": (hidden, 16, 2, 2), "lora_unet_context_embedder": (hidden, 4096),
                    "lora_unet_t_embedder_mlp_0": (hidden, 256), "lora_unet_t_embedder_mlp_2": (hidden, hidden),
                    "lora_unet_y_embedder_mlp_0": (hidden, 2048), "lora_unet_y_embedder_mlp_2": (hidden, hidden),
                    "lora_unet_final_layer_linear": (2 * 2 * 16, hidden),
                    "lora_unet_final_layer_adaLN_modulation_1": (2 * hidden, hidden)}


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_a_model_wrapped_by_peft_maps_like_the_bare_one(arch):
    from peft import LoraConfig, inject_adapter_in_model

    if arch == "flux":
        build = lambda: FluxTransformer2DModel(**TOY_FLUX, guidance_embeds=True)  # noqa: E731
    else:
        build = lambda: SD3Transformer2DModel(**TOY_SD3_VARIANTS["sd3.5-medium"])  # noqa: E731
    bare = build()
    wrapped = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["to_q", "to_k", "add_v_proj", "proj_mlp", "linear", "proj"]), build())
    assert any(".base_layer" in n for n, _ in wrapped.named_modules())
    assert original_modules(arch, wrapped) == original_modules(arch, bare)
    assert diffusers_to_original(arch, wrapped) == diffusers_to_original(arch, bare)
