"""The memory planner (`sdlora plan`, `--vram`): weights counted from headers or the meta device, activations
counted on meta tensors (checked against the same count on real tensors), and the choice it makes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdlora import plan
from sdlora.cli import main
from sdlora.lora.inject import add_lora
from sdlora.lora.targets import find_targets
from sdlora.models import load_base
from sdlora.train import activations
from sdlora.train import step as S


def _count(model: str, device: str, resolution: int = 64, dtype=torch.float32) -> activations.Activations:
    """Activations of one tiny-model forward with LoRA on the `full` targets, on real tensors or on meta ones.
    float32: in bf16 the CPU's layer norm keeps its saved mean and rstd in bf16 where CUDA's (and the meta
    kernels, which follow CUDA) keep float32."""
    base = load_base(model)
    den, spec = base.denoiser.requires_grad_(False), base.spec
    add_lora(den, find_targets(den, "unet", "full", spec), 2, 2.0)
    den.to(device=device, dtype=dtype)
    objective = S.objective_for(spec, base.noise_scheduler, den.config)
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    lat = torch.randn(1, base.vae.config.latent_channels, side, side, generator=g).to(device, dtype)
    cond = torch.randn(1, 9, den.config.joint_attention_dim, generator=g).to(device, dtype)
    added = {"pooled": torch.randn(1, den.config.pooled_projection_dim, generator=g).to(device, dtype)}
    t = objective.fixed_timesteps(500, 1, device)
    return activations.count(den, lambda: objective.predict(den, lat, t, cond, added))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_meta_count_equals_the_count_on_real_tensors(model):
    real, meta = _count(model, "cpu"), _count(model, "meta")
    assert meta.units == real.units and meta.outside == real.outside
    assert len(real.units) == (19 + 38 if model == "tiny-flux" else 24)  # one unit per transformer block
    assert real.peak(True) < real.peak(False)


@pytest.mark.slow
def test_saved_bytes_are_affine_in_the_tokens():
    """Every tensor a DiT block saves is per token (the fused-attention count has no token x token matrix), so the
    bytes of a block at 3 resolutions lie on one line in the number of image tokens."""
    counts = {r: _count("tiny-flux", "meta", r) for r in (32, 64, 128)}
    tokens = {r: (r // 16) ** 2 for r in counts}
    for i in (0, 19):  # a double and a single block
        s = {r: counts[r].units[i][1] for r in counts}
        assert (s[64] - s[32]) * (tokens[128] - tokens[64]) == (s[128] - s[64]) * (tokens[64] - tokens[32])


def _injected(module: torch.nn.Module, targets: list[str], rank: int) -> int:
    """LoRA values PEFT adds to `module` on `targets` (what training trains)."""
    before = {id(q) for q in module.parameters()}
    add_lora(module, targets, rank, float(rank))
    return sum(q.numel() for q in module.parameters() if id(q) not in before)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_lora_values_counted_from_shapes_equal_the_injected_ones_tiny(model):
    """The planner counts LoRA values from the targeted layers' shapes (no injection); each component and preset
    gives what PEFT's injection adds, on the targets `find_targets` picks for training."""
    seen = 0
    for preset in ("default", "attn", "full"):
        base = load_base(model)  # a fresh one per preset: the injection changes it
        parts = {"unet": base.denoiser} | {c: te for c, (_, te) in base.text_encoders.items()}
        for comp, module in parts.items():
            targets = find_targets(module, comp, preset, base.spec)
            if targets:
                assert plan.lora_values(module, targets, 3) == _injected(module, targets, 3) > 0, (preset, comp)
                seen += 1
    assert seen >= 3


@pytest.mark.parametrize(("arch", "variant", "preset"), [("sd1", "", "full"), ("sdxl", "", "attn"),
                                                         ("sd3", "large", "default"), ("flux", "", "full")])
def test_lora_values_counted_from_shapes_equal_the_injected_ones_real_size(arch, variant, preset):
    from sdlora import archs

    spec = archs.get(arch)
    den = archs.meta_model(arch, spec.denoiser, variant).requires_grad_(False)
    targets = find_targets(den, "unet", preset, spec)
    assert plan.lora_values(den, targets, 16) == _injected(den, targets, 16) > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3", "tiny-sdxl", "black-forest-labs/FLUX.1-dev"])
def test_repeated_blocks_are_replayed_with_the_same_count(model, monkeypatch):
    """The activation count replays a block identical to one already run instead of running it: every unit's
    bytes, what is saved outside the units and each counted tensor are those of running every block."""
    traces, acts = {}, {}
    count = activations.count
    for repeat in (False, True):
        monkeypatch.setattr(activations, "count", lambda d, r, trace=None, repeat=True, _rep=repeat: count(
            d, r, trace=traces.setdefault(_rep, []), repeat=_rep))
        acts[repeat] = plan.Planner(plan.shape_of(model), plan.Run(64 if model.startswith("tiny") else None)).acts
    assert acts[True].units == acts[False].units and acts[True].outside == acts[False].outside
    assert traces[True] == traces[False] and len(traces[True]) > 100


@pytest.fixture(scope="session")
def flux_planner():
    return plan.Planner(plan.shape_of("black-forest-labs/FLUX.1-dev"), plan.Run(None, 1, 16))


def test_flux_dev_plans(flux_planner):
    p = flux_planner
    params = sum(t.numel() for t in p.shape.denoiser.parameters() if not t.requires_grad)
    assert params == 11_901_408_320  # FLUX.1-dev's transformer (docs/big-models.md: 11.90 B)
    assert p.whole["bf16"] == 2 * params
    assert 11.9e9 < p.whole["fp8"] < 12.1e9  # Linear weights at 1 byte, embedders and norms in bf16
    plans = {v: p.plan(v) for v in (8, 12, 16, 24)}
    assert all(x.fits and x.total <= x.budget for x in plans.values())
    swaps = [plans[v].choice.swap for v in (8, 12, 16, 24)]
    assert swaps == sorted(swaps, reverse=True) and swaps[0] > 0 and swaps[-1] == 0
    assert all(x.choice.checkpointing for x in plans.values())
    small = p.plan(4)
    assert not small.fits and small.smallest[1] > small.budget
    assert "does not fit" in small.text() and "--blocks-to-swap 38" in small.text()


@pytest.mark.slow
def test_plan_reads_a_folder_from_its_headers(tmp_path, capsys):
    base = load_base("tiny-sd3")
    base.pipeline().save_pretrained(tmp_path / "m")
    shape = plan.shape_of(str(tmp_path / "m"))
    for comp, module in (("unet", base.denoiser), ("te3", base.text_encoders["te3"][1]), ("vae", base.vae)):
        # what the files hold: parameters and persistent buffers (SD3's position embedding), tied weights once
        unique = {t.data_ptr(): t.numel() for t in module.state_dict().values()}
        assert shape.header_params[comp] == sum(unique.values())
    assert next(shape.denoiser.parameters()).is_meta
    assert main(["plan", "--model", str(tmp_path / "m"), "--vram", "1", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "chosen: --base-precision bf16" in out and "activations" in out and "measured on the meta device" in out
    assert main(["plan", "--model", str(tmp_path / "m"), "--vram", "0.6", "--resolution", "64"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_text_encoders_encoding_first_cost_the_larger_phase_not_the_sum(tmp_path):
    """A FLUX folder loads piece by piece: frozen text encoders encode every prompt and leave before the transformer
    loads, so the GPU holds the larger phase. On a card where T5 fits alone but not next to the transformer, the
    plan takes the first choice; the same model planned as one phase (text encoders beside the transformer until
    every prompt is cached: built-in models, hub ids) needs more than that card."""
    load_base("tiny-flux").pipeline().save_pretrained(tmp_path / "m")
    planner = plan.Planner(plan.shape_of(str(tmp_path / "m")), plan.Run(64, 1, 4, train_te=False))
    assert planner.shape.encode_first
    first = plan.Choice()
    (_, text), (_, train) = planner.phases(first)
    text_sum, train_sum = (sum(n for w, n, _ in rows if not w.startswith("  ")) for rows in (text, train))
    t5 = planner.te_bytes["te3", "bf16"]
    assert [w for w, _, _ in text] == ["text encoder te1 (bf16)", "text encoder te3 (bf16)", "VAE weights (fp32)"]
    assert not any(w.startswith("text encoder") for w, _, _ in train)
    assert planner.total(first) == max(text_sum, train_sum)
    # (a fresh shape: a planner adds LoRA layers to its shape's denoiser to count the activations)
    one_phase = plan.Planner(dataclasses.replace(plan.shape_of(str(tmp_path / "m")), encode_first=False),
                             planner.run)
    assert one_phase.total(first) == train_sum + text_sum - planner.vae[0]  # every row once
    budget = (max(text_sum, train_sum) + one_phase.total(first)) / 2
    assert t5 <= budget < t5 + train_sum  # T5 fits alone, not next to the transformer
    vram = (budget + plan.CONTEXT) / plan.GIB / (1 - plan.FRAGMENTATION)
    chosen = planner.plan(vram)
    assert chosen.choice == first and chosen.total == max(text_sum, train_sum)
    assert "text encoding (prompts encoded first" in chosen.text() and "  training: " in chosen.text()
    assert one_phase.plan(vram).choice != first


def test_plan_refuses_what_it_cannot_size(capsys):
    assert main(["plan", "--model", "someone/some-model", "--vram", "12"]) == 2
    assert "sdlora plan reads a local diffusers folder" in capsys.readouterr().err


def test_every_preset_parses_through_train_config():
    """Each configs/*.toml is valid for `sdlora train --config` (unknown keys and wrong types are refused there)."""
    from sdlora.config import load_toml, make_config
    from tests.helpers import DOG, ROOT

    presets = sorted((ROOT / "configs").glob("*.toml"))
    assert {p.stem for p in presets} >= {f"subject-flux-dev-{v}gb" for v in (8, 12, 16, 24)}
    for path in presets:
        cfg = make_config(load_toml(path) | {"images": str(DOG), "prompt": "sks dog"})
        assert cfg.vram is None or cfg.vram in (8, 12, 16, 24), path


@pytest.mark.slow
def test_vram_plans_the_run_before_loading(tmp_path):
    """--vram: the run takes the plan's settings (here: gradient checkpointing, which the card needs at this size)
    and prints the plan; a card too small is refused in one line before the model loads."""
    from tests.helpers import train_tiny

    planner = plan.Planner(plan.shape_of("tiny-flux"), plan.Run(64, 1, 4))
    need_gc = planner.total(plan.Choice(checkpointing=True))
    assert need_gc < planner.total(plan.Choice())
    vram = (need_gc + plan.CONTEXT) / plan.GIB / (1 - plan.FRAGMENTATION) + 1e-6
    lines = []
    from sdlora.config import make_config
    from sdlora.train.loop import train
    from tests.helpers import DOG

    res = train(make_config({"images": str(DOG), "prompt": "sks dog", "model": "tiny-flux", "steps": 1,
                             "resolution": 64, "out": str(tmp_path / "a.safetensors"), "vram": vram,
                             "no_eval_loss": True}), log=lines.append)
    assert res.path.exists()
    assert any("chosen: --base-precision bf16 --te-precision bf16 --gradient-checkpointing" in str(x) for x in lines)
    assert res.model.denoiser.gradient_checkpointing
    from sdlora.errors import SdloraError

    with pytest.raises(SdloraError, match=r"^--vram 0\.1: the run does not fit; the smallest plan .* needs"):
        train_tiny(tmp_path / "b.safetensors", model="tiny-flux", resolution=64, vram=0.1)
