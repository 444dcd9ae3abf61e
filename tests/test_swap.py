"""Block swap (`--blocks-to-swap`, sdlora/train/swap.py): on the CPU the device is the host, but the mechanism runs
as on a GPU (every use copies the block's frozen weights into fresh tensors put in the block for its forward, and
again for its backward). Training with it gives the same loss and the same adapter, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdlora import archs
from sdlora.errors import SdloraError
from sdlora.lora.inject import add_lora
from sdlora.lora.targets import find_targets
from sdlora.models import load_base
from sdlora.train import swap
from tests.helpers import train_tiny


@pytest.mark.parametrize("model,n,gc,preset,base", [("tiny-flux", 5, True, "full", None),
                                                    ("tiny-sd3", 6, False, "default", None),
                                                    ("tiny-flux", 6, False, "default", "fp8"),
                                                    ("tiny-sd3", 4, True, "default", "nf4")])
@pytest.mark.slow
def test_training_with_swap_is_bit_identical(tmp_path, model, n, gc, preset, base):
    """Also with a quantised base (--base-precision fp8 / nf4): the swapped copies are the stored weights."""
    steps = 2
    kw = {"model": model, "steps": steps, "gradient_checkpointing": gc, "no_gradient_checkpointing": not gc,
          "preset": preset, "rank": 2, "base_precision": base}
    ref = train_tiny(tmp_path / "ref.safetensors", **kw)
    got = train_tiny(tmp_path / "swap.safetensors", blocks_to_swap=n, **kw)
    a, b = load_file(ref.path), load_file(got.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref.loss_before, ref.loss_after) == (got.loss_before, got.loss_after)
    spec = got.model.spec
    counts = swap.split(spec, swap.lengths_of(spec, got.model.denoiser), n)
    assert len(got.swap_stats) == sum(counts)
    for st in got.swap_stats:  # every swapped block was on the device for each forward and each backward
        assert st["forward"] >= steps and st["backward"] >= steps
        if gc:  # one recomputation per block and step, nothing else needs its weights in backward
            assert st["backward"] == steps
        assert st.get("copies", 0) + st.get("prefetched", 0) >= 1
    # with more blocks swapped than are kept at once, each is copied again for every forward and backward
    copies = sum(st.get("copies", 0) + st.get("prefetched", 0) for st in got.swap_stats)
    assert copies >= 2 * steps * (sum(counts) - swap.CAPACITY)


def _tiny_flux_with_lora():
    base = load_base("tiny-flux")
    torch.manual_seed(0)
    den = base.denoiser.requires_grad_(False)
    add_lora(den, find_targets(den, "unet", "full", base.spec), 2, 2.0)
    for n, p in den.named_parameters():  # LoRA ups are zero-initialised: give them values so every path has gradients
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return base, den


def _step(den, gen):
    h = torch.randn(1, 16, 64, generator=gen)
    kw = {"hidden_states": h, "encoder_hidden_states": torch.randn(1, 7, 32, generator=gen),
          "pooled_projections": torch.randn(1, 32, generator=gen), "timestep": torch.tensor([0.5]),
          "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3), "guidance": torch.tensor([1.0])}
    den(**kw).sample.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in den.named_parameters() if p.requires_grad}
    den.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("gc", [False, True])
def test_swap_counts_each_block_forward_and_backward(gc):
    """The hooks run for every swapped block: one forward use and at least one backward use per step (exactly one,
    the recomputation, under gradient checkpointing); the LoRA weights are the same objects, never swapped, and the
    host weights are back in the block between uses."""
    base, den = _tiny_flux_with_lora()
    if gc:
        den.enable_gradient_checkpointing()
    ref = _step(den, torch.Generator().manual_seed(1))
    lora = {n: p for n, p in den.named_parameters() if p.requires_grad}
    blocks = swap.chosen(base.spec, den, 38)
    assert len(blocks) == 19 + 38  # N = 38 is every block of FLUX.1 (19 double + 38 single)
    host = {id(p) for b in blocks for p in b.parameters() if not p.requires_grad}
    s = swap.BlockSwap(den, blocks, torch.device("cpu"))
    got = _step(den, torch.Generator().manual_seed(1))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for st in s.stats:
        assert st["forward"] == 1 and (st["backward"] == 1 if gc else st["backward"] >= 1)
    assert sum(st.get("copies", 0) + st.get("prefetched", 0) for st in s.stats) >= 2 * len(blocks) - 2
    assert all(p is lora[n] for n, p in den.named_parameters() if p.requires_grad)
    assert {id(p) for b in blocks for p in b.parameters() if not p.requires_grad} == host
    s.close()


def test_swap_limits_are_one_line_errors():
    flux, sd3, sdxl = archs.get("flux"), archs.get("sd3"), archs.get("sdxl")
    assert swap.maximum(flux, (19, 38)) == 38 and swap.split(flux, (19, 38), 28) == (14, 28)
    assert swap.maximum(sd3, (38,)) == 38 and swap.maximum(sd3, (24,)) == 24
    with pytest.raises(SdloraError, match=r"--blocks-to-swap 39 .* maximum is 38$"):
        swap.check(flux, (19, 38), 39)
    with pytest.raises(SdloraError, match=r"--blocks-to-swap 25 .*24 transformer_blocks.*maximum is 24$"):
        swap.check(sd3, (24,), 25)
    with pytest.raises(SdloraError, match="not SDXL"):
        swap.check(sdxl, (), 1)
