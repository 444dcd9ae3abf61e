"""SD 3.x and FLUX.1 (diffusion transformers): the real sizes, the tiny models' names, text conditioning and the
flow objective against diffusers, training from the command line, and the files in diffusers' own loader, in
generate, merge and verify.

References nobody here wrote: diffusers' pipelines (`encode_prompt`), its flow-matching scheduler (`scale_noise`,
the dynamic shift), its LoRA loaders (`load_lora_weights`, and FLUX's kohya converter on a real-width file), and
hand-computed W0 + (alpha/r)·up·down. The original-model names themselves are checked against diffusers'
single-file converters in tests/test_dit_names.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora import archs
from sdlora.formats import dit, kohya, layouts
from sdlora.formats.read import read_adapter
from sdlora.models import load_base
from sdlora.train import step as S
from tests.helpers import DOG, quiet, run_main, train_tiny

FAMILIES = {"tiny-sd3": "sd3", "tiny-flux": "flux"}
# the tests of the trained adapters share an xdist worker, so that each is trained once
SHARES_TRAINED = pytest.mark.xdist_group("dit-trained")


def run_cli(capsys, *args):
    """`sdlora ARGS` in-process; it must succeed."""
    p = run_main(capsys, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


class _PerFamily(Mapping):
    """model -> its adapter file, trained on first use by `sdlora train` (in-process, through sdlora.cli.main; 4 steps
    at 64 px, a high LR so the deltas are far from zero)."""

    def __init__(self, folder: Path):
        self._folder, self._files = folder, {}

    def __getitem__(self, model: str) -> Path:
        from sdlora.cli import main

        if model not in self._files:
            f = self._folder / f"{model}.safetensors"
            code = main(["train", "--model", model, "--images", str(DOG), "--prompt", "sks dog", "--steps", "4",
                         "--lr", "1e-2", "--out", str(f), "--no-cache", "--no-eval-loss"])
            assert code == 0 and f.is_file()
            self._files[model] = f
        return self._files[model]

    def __iter__(self):
        return iter(FAMILIES)

    def __len__(self):
        return len(FAMILIES)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Mapping[str, Path]:
    return _PerFamily(tmp_path_factory.mktemp("dit"))


# ---------------------------------------------------------------- real sizes, names


@pytest.mark.parametrize("arch,variant,published", [
    ("flux", "", 11.9e9),  # FLUX.1-dev: "12B"; the 11.9 B of BFL's model card
    ("flux", "schnell", 11.9e9),
    ("sd3", "", 2.2e9),  # SD 3.5 Medium's MMDiT-X (2.5 B with its embedders and text projection, per SAI)
    ("sd3", "large", 8.1e9),  # SD 3.5 Large: 8.1 B
])
def test_real_transformers_build_on_meta_with_their_published_sizes(arch, variant, published):
    n = sum(p.numel() for p in archs.meta_model(arch, "transformer", variant).parameters())
    assert abs(n - published) / published < 0.03, n


def test_t5_xxl_encoder_is_the_real_size():
    t5 = archs.meta_model("sd3", "te3")
    assert type(t5).__name__ == "T5EncoderModel"
    assert abs(sum(p.numel() for p in t5.parameters()) - 4.76e9) / 4.76e9 < 0.01  # T5 v1.1 XXL encoder


@pytest.mark.parametrize("model,arch", FAMILIES.items())
def test_tiny_models_have_exactly_the_real_module_names(model, arch):
    base = load_base(model)
    tiny = layouts.table_of(base.components, arch)
    real = layouts.kohya_table(arch)
    assert set(tiny) == set(real)
    assert all(len(tiny[k].shape) == len(real[k].shape) for k in tiny)


def test_kohya_names_of_the_real_flux_are_bfl_paths():
    table = layouts.kohya_table("flux")
    assert table["lora_unet_double_blocks_18_img_attn_qkv"].shape == (9216, 3072)
    assert table["lora_unet_single_blocks_37_linear1"].shape == (21504, 3072)
    assert [p for p, _, _ in table["lora_unet_single_blocks_0_linear1"].parts] == [
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    t5 = [k for k, m in table.items() if m.component == "te3"]
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te1_text_model_encoder_layers_11_self_attn_q_proj" in table


# ---------------------------------------------------------------- conditioning and objective


@pytest.mark.parametrize("model", FAMILIES)
def test_text_conditioning_equals_the_diffusers_pipeline(model):
    base = load_base(model)
    pipe = base.pipeline()
    prompts = ["sks dog", "a photo of a cat on a mat"]
    with torch.no_grad():
        hidden, pooled = S.encode_text(base.spec, list(base.text_encoders.values()), prompts)
        seq = base.generation_kwargs()["max_sequence_length"]
        if base.arch == "sd3":
            ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                       do_classifier_free_guidance=False, max_sequence_length=seq)
        else:
            ref, ref_pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=seq)
    assert torch.equal(hidden, ref) and torch.equal(pooled, ref_pooled)


def test_flow_noising_is_the_flow_match_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = load_base("tiny-sd3")
    obj = S.objective_for(base.spec, base.noise_scheduler, base.denoiser.config)
    x, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sigmas = torch.tensor([0.1, 0.5, 0.93])
    ref_sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref = torch.stack([ref_sched.scale_noise(x[i:i + 1], torch.tensor([s * 1000]), noise[i:i + 1])[0]
                       for i, s in enumerate(sigmas.tolist())])
    torch.testing.assert_close(obj.noisy(x, noise, sigmas), ref)
    assert torch.equal(obj.target(x, noise, sigmas), noise - x)


def test_flux_timesteps_are_shifted_as_its_pipeline_shifts_them():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    base = load_base("tiny-flux")
    obj = S.objective_for(base.spec, base.noise_scheduler, base.denoiser.config)
    shape = torch.Size([4, 16, 128, 128])  # 1024 px: 4096 image tokens, the largest shift
    got = obj.timesteps(shape, torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    c = base.noise_scheduler.config
    mu = calculate_shift(4096, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref = base.noise_scheduler.time_shift(mu, 1.0, u)  # what FluxPipeline's sigmas go through
    torch.testing.assert_close(got, ref)
    assert math.isclose(mu, 1.15, rel_tol=1e-6)


# ---------------------------------------------------------------- files


def _expected_deltas(path, base) -> dict[str, torch.Tensor]:
    """diffusers module path -> ΔW, hand-computed from the kohya file: (alpha/r)·up·down of each fused module,
    its rows cut into the diffusers modules by the original model's layout."""
    sd = load_file(str(path))
    table = layouts.table_of(base.components, base.arch)
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight") or not key.startswith("lora_unet_"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up, alpha = sd[key].float(), sd[f"{name}.lora_up.weight"].float(), float(sd[f"{name}.alpha"])
        delta = alpha / down.shape[0] * up @ down
        m = table[name]
        parts = m.parts or ((m.module_path, 0, m.shape[0]),)
        i = 0
        for p, a, b in parts:
            out.setdefault(p, torch.zeros_like(base.denoiser.get_submodule(p).weight))[a:b] += delta[i:i + b - a]
            i += b - a
    return out


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_trained_file_has_kohya_names_alpha_and_metadata(trained, model):
    f = read_adapter(trained[model])
    spec = archs.get(FAMILIES[model])
    assert f.arch == spec.id
    assert all(n.startswith("lora_unet_") for n in f.modules)
    qkv = [m for n, m in f.modules.items() if n.endswith(("_attn_qkv", "_linear1"))]
    assert qkv and all(m.alpha == 3 * 4 and m.rank == 3 * 4 for m in qkv)  # 3 parts of rank 4, alpha 4 each
    md = f.metadata
    if spec.id == "flux":
        assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    else:
        assert md["ss_base_model_version"] == "5-medium"
        assert md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert md["ss_v2"] == "False"


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_diffusers_load_lora_weights_applies_every_module_exactly(trained, model, tmp_path, capsys):
    base = load_base(model)
    want = _expected_deltas(trained[model], base)
    conv = tmp_path / "diffusers.safetensors"
    run_cli(capsys, "convert", trained[model], conv, "--to", "diffusers")
    w0 = {p: base.denoiser.get_submodule(p).weight.detach().clone() for p in want}
    pipe = base.pipeline()
    pipe.load_lora_weights(str(conv), adapter_name="sks")
    pipe.fuse_lora(lora_scale=1.0)
    # every module with a non-zero delta is applied (SD3's last context block's query gets no gradient: the
    # block's text output is discarded, so its delta stays zero)
    from sdlora.lora.targets import find_targets

    trained_modules = find_targets(base.denoiser, "unet", "default", base.spec)
    assert sum(bool(d.any()) for d in want.values()) >= len(trained_modules) - (base.arch == "sd3")
    for p, d in want.items():
        w = pipe.transformer.get_submodule(p)
        w = getattr(w, "base_layer", w).weight
        assert torch.equal(w, w0[p]) != bool(d.any()), p
        torch.testing.assert_close(w, w0[p] + d, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_diffusers_reads_a_real_width_kohya_flux_file_directly():
    """diffusers' FLUX kohya converter hard-codes FLUX.1's widths, so this file has real shapes (two blocks):
    written by sdlora's fusion from per-module LoRAs, read by `FluxPipeline.lora_state_dict`, every diffusers
    module gets back exactly its own (alpha/r)·up·down."""
    from diffusers import FluxPipeline

    model = archs.meta_model("flux", "transformer")
    originals = dit.original_modules("flux", model)
    g = torch.Generator().manual_seed(0)
    trained = {}
    for p, _ in model.named_modules():
        if p.startswith(("transformer_blocks.0.attn.", "single_transformer_blocks.0.attn.")) and \
                p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            w = model.get_submodule(p).weight
            trained[p] = ("lora", {"down": torch.randn(2, w.shape[1], generator=g),
                                   "up": torch.randn(w.shape[0], 2, generator=g)}, 3.0)
    fused = kohya.fuse(trained, {o: parts for o, parts in originals.items()
                                 if any(q in trained for q, _, _ in parts)})
    f = kohya.from_trained({"unet": trained}, "flux", originals)
    assert set(f.modules) == {"lora_unet_" + o.replace(".", "_") for o in fused}
    new = FluxPipeline.lora_state_dict(kohya.to_tensors(f))
    new = new[0] if isinstance(new, tuple) else new
    for p, (_, t, alpha) in trained.items():
        a, b = new[f"transformer.{p}.lora_A.weight"], new[f"transformer.{p}.lora_B.weight"]
        torch.testing.assert_close(b @ a, alpha / 2 * t["up"] @ t["down"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_verify_says_every_loader_loads_it(trained, model, capsys):
    p = run_cli(capsys, "verify", trained[model])
    n = len(read_adapter(trained[model]).modules)
    assert f"kohya     loads {n}/{n}" in p.stdout and f"ComfyUI   loads {n}/{n}" in p.stdout
    assert f"load_lora_weights loads {n}/{n}" in p.stdout and p.stdout.rstrip().endswith("OK")


# ---------------------------------------------------------------- generate, blend, merge


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_blend_fuses_exactly_the_hand_computed_delta(trained, model):
    from sdlora.infer.session import Session

    s = Session(model)
    want = _expected_deltas(trained[model], s.base)
    w0 = {p: s.base.denoiser.get_submodule(p).weight.detach().clone() for p in want}
    r = s.add(trained[model])
    assert not r.unmatched
    s.blender.set_strengths({r.file.name: 0.5})
    for p, d in want.items():
        torch.testing.assert_close(s.base.denoiser.get_submodule(p).weight, w0[p] + 0.5 * d, rtol=1e-5, atol=1e-6)
    s.blender.set_strengths({})
    assert all(torch.equal(s.base.denoiser.get_submodule(p).weight, w0[p]) for p in want)


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_generate_writes_an_image_with_the_adapter(trained, model, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "x.png"
    p = run_cli(capsys, "generate", "--model", model, "--lora", f"{trained[model]}:0.8", "--prompt", "sks dog",
                "--steps", 3, "--out", out)
    assert "Euler" in p.stderr  # flow-matching Euler, whatever --scheduler says
    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert "<lora:" in im.info["parameters"]


@pytest.mark.slow
@SHARES_TRAINED
def test_merge_writes_a_diffusers_model_with_the_fused_weights(trained, tmp_path):
    from sdlora.merge import merge

    model = "tiny-flux"
    base = load_base(model)
    want = _expected_deltas(trained[model], base)
    w0 = {p: base.denoiser.get_submodule(p).weight.detach().clone() for p in want}
    out = merge(model, [(str(trained[model]), 1.0, 1.0)], tmp_path / "merged")
    merged = load_base(str(out))
    assert merged.arch == "flux"
    for p, d in want.items():
        torch.testing.assert_close(merged.denoiser.get_submodule(p).weight, w0[p] + d, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="pass a folder"):
        merge(model, [(str(trained[model]), 1.0, 1.0)], tmp_path / "merged.safetensors")


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("option,message", [
    ({"network": "loha"}, "--network loha is not available for FLUX.1"),
    ({"dora": True}, "--dora is not available for FLUX.1"),
    ({"min_snr_gamma": 5.0}, "rectified flow"),
])
def test_options_a_flow_transformer_cannot_train_are_refused_in_one_line(tmp_path, option, message):
    from sdlora.errors import SdloraError

    with pytest.raises(SdloraError, match=re.escape(message)) as e:
        train_tiny(tmp_path / "x.safetensors", model="tiny-flux", steps=1, **option)
    assert "\n" not in str(e.value) and not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_attn_preset_trains_the_clip_text_encoders_and_t5_runs_once_per_prompt(tmp_path):
    """With CLIP-L and bigG trained, T5-XXL stays frozen and its output is cached per prompt: 3 steps on one
    prompt run T5 once, and the conditioning equals the uncached computation."""
    from sdlora.config import make_config
    from sdlora.train.loop import train

    base = load_base("tiny-sd3")
    t5_calls = []
    base.text_encoder_3.register_forward_hook(lambda *a: t5_calls.append(1))
    cfg = make_config(dict(images=str(DOG), prompt="sks dog", model="tiny-sd3", preset="attn", steps=3, lr=1e-3,
                           out=str(tmp_path / "a.safetensors"), seed=0, no_eval_loss=True))
    r = train(cfg, log=quiet, base=base)
    f = read_adapter(r.path)
    assert {kohya.component_of(n) for n in f.modules} == {"unet", "te1", "te2"}  # CLIP-L and bigG, not T5 (te3)
    assert len(t5_calls) == 1
    fresh = load_base("tiny-sd3")
    with torch.no_grad():
        t5 = S.encode_text(fresh.spec, list(fresh.text_encoders.values()), ["sks dog"])
        clip_only = {"te3": (fresh.text_encoder_3(S._ids(fresh.tokenizer_3, ["sks dog"], 256))[0], None)}
        assert all(torch.equal(a, b) for a, b in zip(
            t5, S.encode_text(fresh.spec, list(fresh.text_encoders.values()), ["sks dog"], clip_only)))


@pytest.mark.slow
@SHARES_TRAINED
@pytest.mark.parametrize("model", FAMILIES)
def test_a_diffusers_named_file_reads_back_as_the_same_deltas(trained, model, tmp_path, capsys):
    """What ai-toolkit, SimpleTuner and diffusers write (separate q/k/v LoRAs): read onto the original modules with
    exactly the kohya file's ΔW. Ranks differ per part (zero columns pruned on the way out), so the unequal-rank
    fusion is exercised too."""
    conv = tmp_path / "diffusers.safetensors"
    run_cli(capsys, "convert", trained[model], conv, "--to", "diffusers")
    ours, back = read_adapter(trained[model]), read_adapter(conv)
    assert back.source == "diffusers" and not back.unknown and back.arch == ours.arch
    for name, m in ours.modules.items():
        d = m.delta()
        if not d.any():  # nothing trained there (SD3's last context query): nothing written for it
            continue
        torch.testing.assert_close(back.modules[name].delta(), d, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_flux_resume_with_bf16_and_gradient_checkpointing_equals_the_uninterrupted_run(tmp_path):
    """Mixed precision, gradient checkpointing and checkpoint/resume on a transformer: a run resumed from its
    step-2 checkpoint ends with the same adapter, bit for bit, as the run that never stopped."""
    from sdlora.config import make_config
    from sdlora.formats.file_io import load
    from sdlora.train import ckpt
    from sdlora.train.loop import train

    def run(out, **extra):
        values = dict(images=str(DOG), prompt="sks dog", model="tiny-flux", steps=3, lr=1e-3, out=str(out), seed=0,
                      mixed_precision="bf16", gradient_checkpointing=True, save_every=2, keep_last=0,
                      no_eval_loss=True) | extra
        return train(make_config(values), log=quiet)

    a = run(tmp_path / "a" / "a.safetensors")
    b = run(tmp_path / "b" / "b.safetensors", resume=str(ckpt.checkpoint_root(a.path) / "step-000002"))
    final_a, final_b = load(a.path)[0], load(b.path)[0]
    assert final_a.keys() == final_b.keys()
    assert [k for k in final_a if not torch.equal(final_a[k], final_b[k])] == []
    assert all(final_a[k].abs().sum() > 0 for k in final_a if "lora_up" in k and "single" not in k)


@pytest.mark.slow
@SHARES_TRAINED
def test_the_app_lists_a_flux_adapter_as_fitting_only_the_flux_model(trained, tmp_path):
    """The app's listing (what its page shows after a model load) for a folder with an SD3 and a FLUX adapter:
    on tiny-flux only the FLUX one fits, and the other says why; the same after switching to tiny-sd3."""
    import shutil

    import app
    from sdlora.infer.session import Session

    folder = tmp_path / "loras"
    folder.mkdir()
    for f in trained.values():
        shutil.copy(f, folder / f.name)
    session, library = Session("tiny-flux"), app.Library(folder)
    library.scan()
    rows = app.listing(session, library)
    fits = {r["label"]: r["fits"] for r in rows}
    assert fits == {"tiny-flux": True, "tiny-sd3": False}
    assert "this adapter is for SD 3.x" in next(r["text"] for r in rows if not r["fits"])
    rows = app.listing(session, library, "tiny-sd3")
    assert {r["label"]: r["fits"] for r in rows} == {"tiny-flux": False, "tiny-sd3": True}


def test_verify_names_kohyas_split_qkv_alpha_pitfall(tmp_path):
    """A kohya FLUX file trained with split_qkv=True: block-diagonal q/k/v saved fused with the per-part alpha
    (kohya-ss/sd-scripts#2204). verify says so, with the fix; sdlora's own fused files (alpha x parts) do not."""
    from sdlora.formats.file_io import atomic_save
    from sdlora.formats.verify import verify_file

    base = load_base("tiny-flux")
    table = layouts.table_of(base.components, "flux")
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    rows, cols = table[name].shape
    r = 4
    down = torch.randn(3 * r, cols)
    up = torch.block_diag(*[torch.randn(rows // 3, r) for _ in range(3)])
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}
    md = {"ss_network_args": '{"split_qkv": "True"}', "ss_base_model_version": "flux1",
          "ss_network_module": "networks.lora_flux"}
    atomic_save(tensors, tmp_path / "split.safetensors", md)
    notes = verify_file(tmp_path / "split.safetensors", model=base).notes
    assert any("split_qkv" in n and "multiply their alpha by 3" in n for n in notes)
    atomic_save(tensors | {f"{name}.alpha": torch.tensor(12.0)}, tmp_path / "fixed.safetensors", md)
    assert not any("split_qkv" in n for n in verify_file(tmp_path / "fixed.safetensors", model=base).notes)


@pytest.mark.slow
def test_attention_kernels_reach_the_transformer_through_diffusers_dispatch(tmp_path):
    """--attention on SD3/FLUX goes through diffusers' attention dispatch (set_attention_backend): the math kernel
    trains the same adapter as the default; the UNet-only eager processor is refused in one line."""
    from sdlora.errors import SdloraError
    from sdlora.formats.file_io import load

    a = train_tiny(tmp_path / "a.safetensors", model="tiny-flux", steps=2, no_eval_loss=True)
    b = train_tiny(tmp_path / "b.safetensors", model="tiny-flux", steps=2, no_eval_loss=True, attention="math")
    ta, tb = load(a.path)[0], load(b.path)[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5)
    assert b.base.denoiser.attn_processors["transformer_blocks.0.attn.processor"]._attention_backend == "_native_math"
    with pytest.raises(SdloraError, match="--attention eager is for the UNet models"):
        train_tiny(tmp_path / "c.safetensors", model="tiny-flux", steps=1, attention="eager")


@pytest.mark.slow
def test_t5_leaves_memory_once_its_prompts_are_cached_while_clip_trains(tmp_path):
    from sdlora.config import make_config
    from sdlora.train import memory
    from sdlora.train.loop import train

    cfg = make_config(dict(images=str(DOG), prompt="sks dog", model="tiny-flux", preset="attn", steps=2, lr=1e-3,
                           out=str(tmp_path / "a.safetensors"), seed=0, no_eval_loss=True))
    r = train(cfg, log=quiet)
    assert memory.released(r.model.text_encoder_2)  # T5: its one prompt cached, weights freed
    assert not memory.released(r.model.text_encoder)  # CLIP-L: trained
    assert not memory.released(r.base.text_encoder_2)  # the caller gets the model whole
