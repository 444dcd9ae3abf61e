"""Issue 20's optimisation controls on the tiny model: LoRA+ (--loraplus-ratio), kohya's network/rank/module dropout,
the cosine-with-restarts and polynomial schedules, --targets/--exclude; each option's effect, its metadata as kohya
records it, and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdlora.config import make_config
from sdlora.errors import SdloraError
from sdlora.formats.read import read_adapter
from sdlora.lora.inject import collect_modules
from tests.helpers import DOG, train_tiny

BASE = dict(images=str(DOG), prompt="sks dog", model="tiny")


def layers(result) -> dict:
    """{component.module: {"down", "up"}} of a run's trained model."""
    return {f"{c}.{n}": roles for c, m in result.base.components.items()
            for n, (_, roles, _) in collect_modules(m).items()}


# ---- LoRA+
def test_loraplus_changes_only_the_up_step(tmp_path):
    """After one AdamW step from B = 0 the gradient of A is zero (it is Bᵀ·…), so A only decays, the same with or
    without LoRA+; B's Adam step is lr·m̂/(√v̂+ε) with the same m̂, v̂: with LoRA+ it is exactly R times as large."""
    ratio = 16.0
    plain = layers(train_tiny(tmp_path / "a.safetensors", steps=1, no_eval_loss=True))
    plus_run = train_tiny(tmp_path / "b.safetensors", steps=1, no_eval_loss=True, loraplus_ratio=ratio)
    plus = layers(plus_run)
    assert plain.keys() == plus.keys() and any(k.startswith("te.") for k in plain)
    for k in plain:
        assert torch.equal(plain[k]["down"], plus[k]["down"]), k
        assert plain[k]["up"].abs().max() > 0, k
        torch.testing.assert_close(plus[k]["up"], ratio * plain[k]["up"], rtol=1e-5, atol=0)
    md = read_adapter(plus_run.path).metadata
    assert json.loads(md["ss_network_args"])["loraplus_lr_ratio"] == "16.0"


@pytest.mark.parametrize("settings, needle", [
    (dict(loraplus_ratio=0.0), "--loraplus-ratio must be positive"),
    (dict(loraplus_ratio=4.0, network="loha"), "--loraplus-ratio needs a down/up pair"),
    (dict(network_dropout=1.0), r"--network-dropout must be in \[0, 1\)"),
    (dict(rank_dropout=0.1, dora=True), "--rank-dropout is kohya's LoRA dropout: it needs --network lora or locon"),
    (dict(module_dropout=0.1, network="lokr"), "--module-dropout is kohya's LoRA dropout"),
    (dict(lr_restarts=0, lr_scheduler="cosine_with_restarts"), "--lr-restarts must be at least 1"),
    (dict(lr_restarts=3), "--lr-restarts applies to --lr-scheduler cosine_with_restarts, not constant"),
    (dict(lr_restarts=9, lr_scheduler="cosine_with_restarts", steps=8), "--lr-restarts 9 cycles do not fit"),
    (dict(lr_scheduler_power=2.0, lr_scheduler="cosine"), "--lr-scheduler-power applies to --lr-scheduler poly"),
    (dict(lr_scheduler="polynomial", lr=1e-8), "--lr must be above the polynomial schedule's end rate"),
    (dict(targets="to_(q"), "--targets 'to_\\(q' is not a valid regex"),
    (dict(exclude=" , "), "--exclude is empty"),
    (dict(clip_skip=0), "--clip-skip must be between 1 and 24"),
    (dict(max_token_length=100), "--max-token-length must be one of 75, 150, 225"),
])
def test_bad_settings_are_one_line_errors(settings, needle):
    with pytest.raises(SdloraError, match=needle) as e:
        make_config(BASE | settings)
    assert "\n" not in str(e.value)


# ---- the schedules
@pytest.mark.parametrize("name, extra", [("cosine_with_restarts", dict(lr_restarts=3)),
                                         ("polynomial", dict(lr_scheduler_power=2.0))])
def test_schedules_follow_their_formula(name, extra):
    """The schedule the run builds (diffusers' get_scheduler with sdlora's arguments) against the formulas: cosine
    restarting `lr_restarts` times after warmup; (lr - end)·(1 - progress)^power + end."""
    from diffusers.optimization import get_scheduler

    from sdlora.train import loraplus, option_checks

    cfg = make_config(BASE | dict(lr_scheduler=name, warmup_steps=2, steps=20, lr=1e-3) | extra)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
                          **loraplus.scheduler_kwargs(cfg))
    got = []
    for _ in range(cfg.steps):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    for s, lr in enumerate(got):
        if s < 2:
            want = cfg.lr * s / 2
        elif name == "cosine_with_restarts":
            progress = (s - 2) / (cfg.steps - 2)
            want = cfg.lr * 0.5 * (1 + math.cos(math.pi * ((3 * progress) % 1.0)))
        else:
            end = option_checks.POLY_LR_END
            want = (cfg.lr - end) * (1 - (s - 2) / (cfg.steps - 2)) ** 2 + end
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), s
    if name == "cosine_with_restarts":  # back to the full rate at each restart
        assert [s for s in range(3, cfg.steps) if got[s] > got[s - 1]] == [8, 14]


# ---- dropout
def _lora_linear(seed=0):
    """A PEFT LoRA layer on a Linear with non-zero B (so that the LoRA path shows), as sdlora injects it."""
    from sdlora.lora.inject import add_lora

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    add_lora(model, ["0"], rank=4, alpha=2.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return model, layer


@pytest.mark.parametrize("kind", ["network", "rank", "module"])
def test_dropout_is_kohyas_formula_in_training_and_off_in_eval(kind):
    """In a training forward the hooked layer gives kohya's LoRAModule.forward, written here with the same draws from
    torch's global generator; in eval mode or without gradients it is the undropped layer exactly."""
    from sdlora.lora import dropout

    model, layer = _lora_linear()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        undropped = model(x)
    p = 0.5
    d = dropout.Dropouts(**{kind: p})
    assert dropout.attach([model], d) == 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), undropped)
    model.train()
    down, up, scale = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    base = layer.base_layer
    for seed in range(4):  # kohya's forward, by hand
        torch.manual_seed(seed)
        lx = torch.nn.functional.linear(x, down.weight)  # not down(x): that is the hooked module
        if kind == "module":
            want = base(x) if torch.rand(1).item() < p else base(x) + up(lx) * scale
        elif kind == "network":
            keep = torch.rand(lx.shape) >= p
            want = base(x) + up(lx * keep / (1 - p)) * scale
        else:
            keep = torch.rand(lx.shape[0], lx.shape[-1]) >= p
            want = base(x) + up(lx * keep[:, None, :]) * (scale / (1 - p))
        torch.manual_seed(seed)
        got = model(x)  # a training forward: train mode, gradients on
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    outs = {tuple(model(x).flatten().tolist()) for _ in range(8)}
    assert len(outs) > 1  # it acts: forwards differ while training
    with torch.no_grad():  # the fixed-noise loss and sample grids run under no_grad, even in train mode
        assert torch.equal(model(x), undropped)


def test_dropout_acts_in_training_and_is_recorded(trained_adapter):
    """A run with all three dropouts trains other weights than one without (same seed); its metadata says them as
    kohya does; the model it leaves is in eval mode, where forwards do not depend on the random state."""
    plain = trained_adapter("dog", steps=3, no_eval_loss=True)
    dropped = trained_adapter("dog", steps=3, no_eval_loss=True, network_dropout=0.3, rank_dropout=0.25,
                              module_dropout=0.2)
    a, b = layers(plain), layers(dropped)
    assert any(not torch.equal(a[k]["up"], b[k]["up"]) for k in a)
    md = read_adapter(dropped.path).metadata
    assert md["ss_network_dropout"] == "0.3"
    args = json.loads(md["ss_network_args"])
    assert (args["rank_dropout"], args["module_dropout"]) == ("0.25", "0.2")
    plain_md = read_adapter(plain.path).metadata
    assert [plain_md[k] for k in ("ss_network_dropout", "ss_clip_skip", "ss_max_token_length")] == ["None"] * 3
    unet = dropped.base.unet
    assert not unet.training
    x = torch.randn(1, 4, 8, 8)
    h = torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        o1 = unet(x, 10, h).sample
        torch.manual_seed(2)
        o2 = unet(x, 10, h).sample
    assert torch.equal(o1, o2)


# ---- --targets / --exclude
def test_targets_and_exclude_pick_modules_beyond_the_preset(trained_adapter):
    plain = trained_adapter("dog", steps=1, no_eval_loss=True)
    picked = trained_adapter("dog", steps=1, no_eval_loss=True, targets=r"attn1\.to_q,ff\.net\.2", exclude="up_blocks")
    p_names = set(layers(plain))
    names = set(layers(picked))
    added = names - p_names
    assert added and all(("attn1.to_q" in n or "ff.net.2" in n) for n in added)
    assert any("attn1.to_q" in n for n in added) and any("ff.net.2" in n for n in added)
    assert not any("up_blocks" in n for n in names)
    assert {n for n in p_names if "up_blocks" not in n} <= names  # the preset's others stay
    args = json.loads(read_adapter(picked.path).metadata["ss_network_args"])
    assert json.loads(args["include_patterns"]) == [r"attn1\.to_q", r"ff\.net\.2"]
    assert json.loads(args["exclude_patterns"]) == ["up_blocks"]
    assert len(read_adapter(picked.path).modules) == len(names)
    unet_only = trained_adapter("dog", steps=1, no_eval_loss=True, exclude="self_attn")  # the text encoder left bare
    assert {n.split(".")[0] for n in layers(unet_only)} == {"unet"}  # is not trained
    assert len(read_adapter(unet_only.path).modules) == sum(n.startswith("unet.") for n in p_names)


@pytest.mark.parametrize("settings, needle", [
    (dict(targets="no_such_module"), "--targets 'no_such_module' matches no Linear or 1x1 conv module of unet, te"),
    (dict(exclude="attn1"), "--exclude 'attn1' matches none of the"),
])
def test_a_regex_that_matches_nothing_is_one_line(tmp_path, settings, needle):
    with pytest.raises(SdloraError, match=needle) as e:
        train_tiny(tmp_path / "x.safetensors", steps=1, **settings)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_run_with_these_controls_resumes_bit_for_bit(tmp_path):
    """LoRA+, all three dropouts and cosine restarts together: a run resumed from its step-2 checkpoint ends with the
    same adapter as the uninterrupted one (the dropout masks come from torch's generator, which checkpoints save)."""
    from sdlora.formats.file_io import load
    from sdlora.train import ckpt

    settings = dict(loraplus_ratio=4.0, network_dropout=0.2, rank_dropout=0.2, module_dropout=0.2,
                    lr_scheduler="cosine_with_restarts", lr_restarts=2, save_every=2, keep_last=0,
                    no_eval_loss=True, no_flip=True)
    a = train_tiny(tmp_path / "a" / "a.safetensors", **settings)
    folder = ckpt.checkpoint_root(a.path) / "step-000002"
    b = train_tiny(tmp_path / "b" / "b.safetensors", resume=str(folder), **settings)
    ta, tb = load(a.path)[0], load(b.path)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(SdloraError, match="rank_dropout"):  # a checkpoint is resumed with its own settings
        train_tiny(tmp_path / "c" / "c.safetensors", resume=str(folder), **(settings | dict(rank_dropout=0.3)))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_loraplus_on_the_other_families(tmp_path, model):
    """The same one-step property on SDXL (two text encoders, two optimizer groups split) and FLUX.1 (a transformer
    whose q/k/v LoRAs the file fuses): A as without LoRA+, B's step R times as large."""
    plain = layers(train_tiny(tmp_path / "a.safetensors", model=model, steps=1, no_eval_loss=True))
    plus = layers(train_tiny(tmp_path / "b.safetensors", model=model, steps=1, no_eval_loss=True, loraplus_ratio=8.0))
    assert plain.keys() == plus.keys() and plain
    for k in plain:
        assert torch.equal(plain[k]["down"], plus[k]["down"]), k
        torch.testing.assert_close(plus[k]["up"], 8.0 * plain[k]["up"], rtol=1e-5, atol=0)
