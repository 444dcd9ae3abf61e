"""--optimizer and --optimizer-args on the tiny model: every optimizer trains, checkpoints its state as
safetensors + JSON, and a resumed run equals the uninterrupted one bit for bit; arguments are typed and checked."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sdlora.config import TrainConfig, make_config
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from sdlora.train import ckpt
from tests.helpers import DOG, main_error, train_tiny

# adamw8bit: min_8bit_size=16 so that the tiny model's LoRA weights really get 8-bit (quantised) state
CASES = {
    "adamw": ("betas=(0.9,0.99)", 1e-3),
    "adamw8bit": ("min_8bit_size=16", 1e-3),
    "prodigy": ("d_coef=2, safeguard_warmup=true", 1.0),
    "adafactor": (None, 1e-3),
    "schedulefree": ("warmup_steps=1", 1e-3),
}


def run(out, **overrides):
    """train_tiny without flips, at the default learning rate unless one is given."""
    return train_tiny(out, **(dict(no_flip=True, lr=TrainConfig.lr) | overrides))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_trains_and_resumes_bit_for_bit(name, tmp_path):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    args, lr = CASES[name]
    settings = dict(optimizer=name, optimizer_args=args, lr=lr, save_every=2, keep_last=0, no_eval_loss=True)
    a = run(tmp_path / "a" / "a.safetensors", **settings)
    folder = ckpt.checkpoint_root(a.path) / "step-000002"
    state = load(folder / "state.safetensors")[0]
    optim_keys = [k for k in state if k.startswith("optim/")]
    assert optim_keys, "no optimizer state in the checkpoint"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["identity"]["optimizer"] == name
    if name == "adamw8bit":  # the quantised state (uint8 + block scales) went into safetensors, the step into JSON
        assert any(state[k].dtype == torch.uint8 for k in optim_keys)
        assert manifest["optimizer_values"]

    b = run(tmp_path / "b" / "b.safetensors", resume=str(folder), **settings)
    final_a, final_b = load(a.path)[0], load(b.path)[0]
    assert final_a.keys() == final_b.keys()
    assert [k for k in final_a if not torch.equal(final_a[k], final_b[k])] == []
    at2 = load(folder / "adapter.safetensors")[0]
    ups = [k for k in final_a if "lora_up" in k]
    assert all(final_a[k].abs().sum() > 0 for k in ups), "the LoRA up weights did not move"
    assert sum(not torch.equal(at2[k], final_a[k]) for k in ups) > 0.9 * len(ups)  # steps 3-4 trained


def _up_norms(tensors: dict, part: str) -> list[float]:
    return sorted(round(float(v.float().norm()), 5) for k, v in tensors.items() if part in k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "schedulefree"])
def test_checkpoint_adapter_holds_the_evaluation_weights(name, tmp_path):
    """Schedule-free AdamW trains weights y but evaluates and saves x: the checkpoint's state keeps y (to resume),
    its adapter x. With AdamW both are the same weights."""
    r = run(tmp_path / "s.safetensors", optimizer=name, steps=3, save_every=2, keep_last=0)
    assert r.loss_before is not None and r.loss_after is not None
    folder = ckpt.checkpoint_root(r.path) / "step-000002"
    state, adapter = load(folder / "state.safetensors")[0], load(folder / "adapter.safetensors")[0]
    same = _up_norms(state, "lora_B") == _up_norms(adapter, "lora_up")
    assert same == (name == "adamw")


@pytest.mark.parametrize("name, args, needle", [
    ("prodigy", "lr=1", "prodigy takes no 'lr'; it takes betas, beta3"),
    ("adamw", "momentum=0.9", "adamw takes no 'momentum'"),
    ("prodigy", "d_coef=big", "d_coef=big for prodigy must be a number"),
    ("adafactor", "relative_step=maybe", "must be true or false"),
    ("adamw", "betas=(0.9,x)", "numbers like (0.9,0.999)"),
    ("adamw", "betas", "cannot read 'betas'"),
])
def test_optimizer_args_are_typed_and_unknown_keys_refused(name, args, needle):
    with pytest.raises(SdloraError, match=None) as e:
        make_config(dict(images="x", prompt="p", optimizer=name, optimizer_args=args))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_optimizer_args_parse_to_typed_values():
    cfg = make_config(dict(images="x", prompt="p", optimizer="prodigy",
                           optimizer_args="betas=(0.9, 0.99) d_coef=2, safeguard_warmup=true growth_rate=1.5"))
    assert cfg.optimizer_kwargs == {"betas": (0.9, 0.99), "d_coef": 2.0, "safeguard_warmup": True,
                                    "growth_rate": 1.5}
    with pytest.raises(SdloraError, match="--optimizer must be one of adamw, adamw8bit, prodigy"):
        make_config(dict(images="x", prompt="p", optimizer="sgd"))


def test_adamw8bit_without_bitsandbytes_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """Where bitsandbytes cannot be imported, the run stops before any model loads, in one line naming the fix.
    (`sys.modules["bitsandbytes"] = None` is how Python itself marks a module as not importable; in this process,
    whatever earlier tests imported, `import bitsandbytes` then fails as on a machine where it cannot load.)"""
    from sdlora import lazy

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(lazy, "_hid", False)  # the mark is not sdlora's own: `lazy.bitsandbytes()` leaves it
    last = main_error(capsys, "train", "--model", "tiny", "--images", DOG, "--prompt", "sks dog", "--steps", "1",
                      "--out", tmp_path / "o.safetensors", "--optimizer", "adamw8bit")
    assert last.startswith("sdlora: error: --optimizer adamw8bit needs bitsandbytes, which cannot load here"), last
    assert "pip install 'sdlora[optim]'" in last
