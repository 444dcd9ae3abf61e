"""A quantised frozen base (--base-precision / --te-precision, sdlora/quant.py): each mode's layers against a hand
reference (the weights as the mode stores them, dequantised by bitsandbytes' own functions), training on every
family with the saved file loading onto the full-precision base, and bitsandbytes imported only when used."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sdlora import quant
from sdlora.errors import SdloraError
from sdlora.formats.read import parse
from sdlora.formats.verify import verify
from sdlora.models import load_base
from tests.helpers import DOG, ROOT, train_tiny


def _mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).requires_grad_(False)


def _stored_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a stored layer computes with, dequantised independently of its forward."""
    import bitsandbytes.functional as F

    if layer.weight.dtype == torch.int8:  # LLM.int8 row-wise absmax: W = CB * SCB / 127
        return layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127
    if layer.weight.dtype == torch.uint8:
        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.float()


@pytest.mark.parametrize("mode", quant.MODES)
def test_each_mode_computes_with_its_stored_weights_forward_and_backward(mode):
    ref, q = _mlp(), quant.quantize_(_mlp(), mode, torch.float32, skip=None)
    for r, s in zip((ref[0], ref[2]), (q[0], q[2])):
        assert quant.stored(s) and not s.weight.requires_grad
        assert quant.weight_shape(s) == tuple(r.weight.shape)
        r.weight.data = _stored_weight(s)  # the reference computes in fp32 with exactly the stored values
        r.bias.data = s.bias.data.float()
    x = torch.randn(4, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), ref(x_ref)
    (y * torch.arange(32)).sum().backward()
    (y_ref * torch.arange(32)).sum().backward()
    # bitsandbytes' int8 matmul quantises the activations too (row-wise, to 8 bits): a relative 1 % at most
    tol = 1e-2 * y_ref.abs().max().item() if mode == "int8" else 1e-5
    assert (y - y_ref).abs().max().item() <= tol
    grad_tol = 1e-2 * x_ref.grad.abs().max().item() if mode == "int8" else 1e-4
    assert (x.grad - x_ref.grad).abs().max().item() <= grad_tol


def test_fp8_keeps_only_the_fp8_weights_for_backward():
    """Autograd saves the stored fp8 weight, not an upcast copy (what diffusers' layerwise casting keeps)."""
    q = quant.quantize_(_mlp(), "fp8", torch.float32, skip=None)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    weights = [t for t in saved if t.dim() == 2 and t.shape[0] in (128, 32) and t.shape[1] in (64, 128)]
    assert weights and all(t.dtype == torch.float8_e4m3fn for t in weights)


def test_bytes_per_param_matches_the_stored_tensors():
    for mode in ("fp8", "int8", "nf4", "bf16"):
        layer = nn.Sequential(nn.Linear(3072, 512, bias=False)).requires_grad_(False)
        quant.quantize_(layer, mode, torch.float32, skip=None)
        measured = quant.module_bytes(layer) / (3072 * 512)
        assert abs(measured - quant.bytes_per_param(mode)) / quant.bytes_per_param(mode) < 0.01, mode


def test_default_skip_keeps_embedders_and_final_layers_per_block_or_whole():
    for name in ("time_text_embed.timestep_embedder.linear_1", "x_embedder", "context_embedder", "proj_out",
                 "norm_out.linear", "conv_out", "text_model.embeddings.token_embedding", "text_projection"):
        assert quant.default_skip(name), name
    for name in ("single_transformer_blocks.3.proj_out", "transformer_blocks.0.norm1.linear",
                 "down_blocks.0.attentions.0.proj_out", "encoder.block.0.layer.1.DenseReluDense.wo"):
        assert not quant.default_skip(name), name
    # called on one block, with its prefix, the block's proj_out is stored like in a whole-model call
    base = load_base("tiny-flux")
    block = base.denoiser.single_transformer_blocks[0]
    quant.quantize_(block, "fp8", torch.float32, prefix="single_transformer_blocks.0")
    assert quant.stored(block.proj_out)


def test_t5_feed_forward_stays_in_its_compute_dtype():
    """transformers' T5 casts its hidden states to wo.weight.dtype: wo is upcast with its block (fp8), or (nf4) its
    packed bytes are viewed as the compute dtype, so T5's output stays close to the full-precision one."""
    base = load_base("tiny-flux")
    t5 = base.text_encoder_2
    ids = base.tokenizer_2(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = t5(ids)[0]
        for mode, wo_dtype in (("fp8", torch.float8_e4m3fn), ("nf4", torch.float32)):
            q = quant.quantize_(copy.deepcopy(t5), mode, torch.float32)
            wo = q.encoder.block[0].layer[1].DenseReluDense.wo
            assert wo.weight.dtype == wo_dtype
            if mode == "nf4":  # 4 bits a weight: the packed bytes, 4 of them to a float32 element
                assert wo.weight.numel() * wo.weight.element_size() * 2 == wo.in_features * wo.out_features
            out = q(ids)[0]
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95, mode


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_every_family_trains_on_a_quantised_base_and_the_file_loads_on_the_full_base(model, tmp_path):
    plain = train_tiny(tmp_path / "plain.safetensors", model=model, steps=2)
    with safe_open(str(plain.path), "pt") as f:
        keys = set(f.keys())
    full = load_base(model)
    for mode in ("nf4", "fp8"):
        r = train_tiny(tmp_path / f"{mode}.safetensors", model=model, steps=2, base_precision=mode,
                       te_precision=mode)
        assert r.loss_after is not None and torch.isfinite(torch.tensor(r.loss_after))
        stored = [m for m in r.base.denoiser.modules() if quant.stored(m)]
        assert stored, "the denoiser was not stored at the mode"
        with safe_open(str(r.path), "pt") as f:
            assert set(f.keys()) == keys
            md = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert md["sdlora_base_precision"] == mode and md["sdlora_te_precision"] == mode
        assert all(t.dtype == torch.float32 for t in tensors.values())  # LoRA stays full precision
        report = verify(parse(tensors, md, where=str(r.path)), model=full, path=str(r.path))
        assert report.ok, report.problems


def test_quantised_adapter_loads_in_diffusers_on_the_fp32_base(tmp_path):
    from peft.tuners.lora import LoraLayer

    r = train_tiny(tmp_path / "nf4.safetensors", steps=2, base_precision="nf4", lr=5e-3)
    with safe_open(str(r.path), "pt") as f:
        n_modules = len([k for k in f.keys() if k.endswith(".alpha")])
    pipe = load_base("tiny").pipeline()
    pipe.load_lora_weights(str(r.path), adapter_name="q")
    assert sum(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules()) == n_modules


def test_te_precision_leaves_a_training_text_encoder_alone(tmp_path):
    from sdlora.config import make_config
    from sdlora.train.loop import train

    for no_te in (False, True):
        said = []
        values = dict(images=str(DOG), prompt="sks dog", model="tiny", steps=1, out=str(tmp_path / "a.safetensors"),
                      te_precision="nf4", no_eval_loss=True, no_text_encoder=no_te, overwrite=True)
        r = train(make_config(values), log=said.append)
        assert any("--te-precision nf4: text encoder te trains, so it stays in float32" in s for s in said) != no_te
        assert any(quant.stored(m) for m in r.base.text_encoder.modules()) == no_te


def test_bad_precision_input_is_one_line(tmp_path):
    with pytest.raises(SdloraError, match="--base-precision must be one of"):
        train_tiny(tmp_path / "x.safetensors", base_precision="int4")
    with pytest.raises(SdloraError, match="--dora needs the base weights in a float dtype"):
        train_tiny(tmp_path / "x.safetensors", base_precision="nf4", dora=True)
    with pytest.raises(SdloraError, match="cannot run it on meta"):  # a device bitsandbytes has no kernels for
        quant.check_mode("nf4", "meta")
    with pytest.raises(SdloraError, match="not a precision"):
        quant.bytes_per_param("q4")


def test_config_precisions_are_the_quant_modes():
    from sdlora.config import BASE_PRECISIONS

    assert BASE_PRECISIONS == quant.MODES


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_default_train_does_not_import_bitsandbytes(tmp_path):
    """The sdlora command loads bitsandbytes only for a run that uses it (sdlora/lazy.py). A fresh process (nothing
    imported by other tests) starts as `python -m sdlora` does and runs `sdlora train`, then an nf4 run; what each
    has imported is read from sys.modules (one process: the imports are paid once)."""
    out = tmp_path / "a.safetensors"
    args = ["train", "--images", str(DOG), "--prompt", "sks dog", "--model", "tiny", "--steps", "1", "--out", str(out),
            "--no-eval-loss"]
    code = ("import json, sys\nfrom sdlora.__main__ import main  # the command's own start: sdlora/lazy.py's mark\n"
            "def loaded(): return sorted(m for m in sys.modules if m.startswith(('bitsandbytes.', 'diffusers.')))\n"
            "args = json.loads(sys.argv[1])\n"
            "seen = [main(args), loaded(), main(args + ['--base-precision', 'nf4', '--overwrite']), loaded()]\n"
            "print('SEEN ' + json.dumps(seen))\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("SEEN ")]
    code1, after_default, code2, after_nf4 = json.loads(line[5:])
    assert code1 == 0 and out.is_file(), p.stderr[-2000:]
    assert any(m.startswith("diffusers.") for m in after_default)  # the run really loaded its libraries...
    # ...but no bitsandbytes submodule: bitsandbytes never really loaded (a refused bare `import bitsandbytes`
    # would leave no submodule either)
    assert not any(m.startswith("bitsandbytes.") for m in after_default), after_default
    assert code2 == 0, p.stderr[-2000:]
    assert any(m.startswith("bitsandbytes.") for m in after_nf4)  # a run that uses it imports it


@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_a_released_quantised_text_encoder_comes_back_whole(mode):
    """T5 leaves memory once its prompts are cached and is reloaded for sample grids (train/memory.py): its
    quantised layers come back with their scales, giving the same output as before."""
    from sdlora.train import memory

    def t5():
        base = load_base("tiny-flux")
        return quant.quantize_(base.text_encoder_2.requires_grad_(False), mode, torch.float32), base.tokenizer_2

    model, tok = t5()
    ids = tok(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids)[0]
        memory.release(model)
        assert memory.released(model)
        memory.restore(model, t5()[0], torch.device("cpu"))
        assert not memory.released(model)
        assert torch.equal(model(ids)[0], before)


@pytest.mark.slow
def test_a_quantised_base_turns_gradient_checkpointing_on_unless_told_not_to(tmp_path):
    """Whoever stores the base narrower is short of memory: fp8/int8/nf4 bases train with gradient checkpointing
    (FLUX.1-dev nf4 on the CPU at 64 px: 2.3 GB of activations over 7.2 GB of weights without it)."""
    from sdlora.config import TrainConfig

    def cfg(**kw):
        return TrainConfig(model="tiny", images=str(DOG), prompt="sks dog", **kw)

    assert not cfg().checkpointing and cfg(gradient_checkpointing=True).checkpointing
    for mode in ("fp8", "int8", "nf4"):
        assert cfg(base_precision=mode).checkpointing
        assert not cfg(base_precision=mode, no_gradient_checkpointing=True).checkpointing
    assert not cfg(base_precision="bf16").checkpointing
    with pytest.raises(SdloraError, match="contradicts --gradient-checkpointing"):
        cfg(gradient_checkpointing=True, no_gradient_checkpointing=True)
    on = train_tiny(tmp_path / "on.safetensors", model="tiny-flux", steps=1, base_precision="fp8")
    off = train_tiny(tmp_path / "off.safetensors", model="tiny-flux", steps=1, base_precision="fp8",
                     no_gradient_checkpointing=True)
    assert on.base.denoiser.gradient_checkpointing and not off.base.denoiser.gradient_checkpointing
