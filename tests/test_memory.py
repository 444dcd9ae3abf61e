"""memory.move converts weights one tensor at a time and hands a memory-mapped tensor's pages back once it is
converted: the converted weights are exactly the originals in the new dtype, a second model mapped from the same
file is untouched, and weights in ordinary (anonymous) memory keep their values. How much RSS that saves is
measured by benchmarks/bench_speed.py, not here."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from sdlora.tiny import tiny_components
from sdlora.train import memory


def test_move_converts_mapped_and_anonymous_weights_without_changing_them(tmp_path):
    tiny_components()["vae"].save_pretrained(tmp_path / "vae")  # a .safetensors file, memory-mapped when loaded
    mapped = AutoencoderKL.from_pretrained(tmp_path / "vae")
    other = AutoencoderKL.from_pretrained(tmp_path / "vae")
    want = {n: p.detach().clone() for n, p in other.named_parameters()}
    memory.move(mapped, torch.device("cpu"), lambda p: torch.bfloat16)
    for n, p in mapped.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[n].to(torch.bfloat16)), n
    for n, p in other.named_parameters():  # the same file mapped again: its pages are its own
        assert torch.equal(p, want[n]), n

    anon = tiny_components()["vae"]
    before = {n: p.detach().clone() for n, p in anon.named_parameters()}
    memory.move(anon, torch.device("cpu"), lambda p: torch.float64)
    assert all(torch.equal(p, before[n].double()) for n, p in anon.named_parameters())
    memory.move(anon, torch.device("cpu"))  # already there in that dtype: nothing changes
    assert all(torch.equal(p, before[n].double()) for n, p in anon.named_parameters())
