"""Structurally bad adapters (issue 11): every command that reads adapters refuses them with one line naming the
module, before any model loads, and writes nothing. The one reader is fuzzed with hypothesis: mutated headers,
shapes, dtypes and truncations either read or give the clean SdloraError, never another exception."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.errors import SdloraError
from sdlora.formats.read import read_adapter

M = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"  # a module of `tiny`: [16, 16]
T = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # [32, 32]
MD = {"ss_base_model_version": "sd_v1", "ss_sd_model_name": "tiny"}


def good() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{M}.lora_down.weight": torch.randn(4, 16, generator=g),
            f"{M}.lora_up.weight": torch.randn(16, 4, generator=g),
            f"{M}.alpha": torch.tensor(2.0), f"{T}.lora_down.weight": torch.randn(4, 32, generator=g),
            f"{T}.lora_up.weight": torch.randn(32, 4, generator=g), f"{T}.alpha": torch.tensor(2.0)}


def with_(**changes) -> dict[str, torch.Tensor]:
    sd = good()
    for suffix, t in changes.items():
        sd[f"{M}.{suffix.replace('__', '.')}"] = t
    return sd


nan_up = good()[f"{M}.lora_up.weight"].clone()
nan_up[3, 1] = float("nan")
CASES = {
    "rank 0": (with_(lora_down__weight=torch.zeros(0, 16), lora_up__weight=torch.zeros(16, 0)), "has rank 0"),
    "1-d down": (with_(lora_down__weight=torch.ones(16)), "a LoRA pair is 2-d (Linear) or 4-d (conv)"),
    "alpha vector": (with_(alpha=torch.ones(4)), "holds 4 values, an alpha is one number"),
    "rank mismatch": (with_(lora_up__weight=torch.ones(16, 3)), "has rank 4 in lora_down but 3 in lora_up"),
    "NaN": (with_(lora_up__weight=nan_up), "holds NaN or Inf values in its up weight"),
    "infinite alpha": (with_(alpha=torch.tensor(float("inf"))), "has alpha inf"),
}


def commands(adapter: Path, out: Path) -> dict[str, list[str]]:
    return {
        "verify": ["verify", str(adapter)],
        "inspect": ["inspect", str(adapter)],
        "convert": ["convert", str(adapter), str(out / "c.safetensors"), "--to", "diffusers"],
        "resize": ["resize", str(adapter), "--rank", "2", "--out", str(out / "r.safetensors")],
        "generate": ["generate", "--model", "tiny", "--lora", str(adapter), "--prompt", "x", "--steps", "1",
                     "--out", str(out / "g.png")],
        "merge": ["merge", "--model", "tiny", "--lora", str(adapter), "--out", str(out / "m.safetensors")],
    }


@pytest.mark.parametrize("case", CASES)
def test_every_command_refuses_a_damaged_adapter_with_one_line(case, tmp_path, capsys):
    tensors, needle = CASES[case]
    adapter = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, adapter, metadata=MD)
    out = tmp_path / "out"
    out.mkdir()
    for name, args in commands(adapter, out).items():
        code = main(args)
        cap = capsys.readouterr()
        lines = [line for line in cap.err.splitlines() if line.startswith("sdlora: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in cap.err, (name, cap.err)
        assert M in lines[0] and needle in lines[0], (name, lines[0])  # names the module and what is wrong
        assert "re-export or retrain it" in lines[0] or "re-export it" in lines[0], (name, lines[0])
        assert list(out.iterdir()) == [], name  # nothing written, not even a temp file


def test_the_good_file_is_read(tmp_path):
    adapter = tmp_path / "ok.safetensors"
    save_file(good(), adapter, metadata=MD)
    a = read_adapter(adapter)
    assert sorted(a.modules) == sorted([M, T]) and a.arch == "sd1" and a.unknown == []


def test_fuzzed_adapter_files_read_or_fail_cleanly(tmp_path_factory):
    """Mutations of a valid kohya file — header JSON edits (dtype, shape, offsets, names), truncations, byte flips —
    give either an AdapterFile whose modules pass the sanity checks or an SdloraError; nothing else escapes."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    root = tmp_path_factory.mktemp("adapter-fuzz")
    src = root / "good.safetensors"
    save_file(good(), src, metadata=MD)
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    keys = sorted(k for k in header if k != "__metadata__")
    outcomes = {"read": 0, "refused": 0}
    counter = iter(range(10**9))

    edit = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(keys),
                  st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "X"])),
        st.tuples(st.just("shape"), st.sampled_from(keys), st.lists(st.integers(0, 40), max_size=4)),
        st.tuples(st.just("offsets"), st.sampled_from(keys), st.tuples(st.integers(0, 2000), st.integers(0, 2000))),
        st.tuples(st.just("rename"), st.sampled_from(keys), st.sampled_from(
            ["lora_unet_x.lora_down.weight", "unet.a.lora_A.weight", "base_model.model.b.lora_B.weight",
             f"{M}.hada_w1_a", f"{M}.dora_scale", "junk"])),
        st.tuples(st.just("drop"), st.sampled_from(keys), st.none()),
    )
    raw = st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1)),
                    st.tuples(st.just("flip"), st.tuples(st.floats(0, 1), st.integers(0, 255))))

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(edits=st.lists(edit, max_size=3), raws=st.lists(raw, max_size=2))
    def check(edits, raws):
        h = json.loads(json.dumps(header))
        for kind, key, arg in edits:
            if key not in h:
                continue
            if kind == "dtype":
                h[key]["dtype"] = arg
            elif kind == "shape":
                h[key]["shape"] = arg
            elif kind == "offsets":
                h[key]["data_offsets"] = sorted(arg)
            elif kind == "rename":
                h[arg] = h.pop(key)
            else:
                del h[key]
        head = json.dumps(h).encode()
        blob = bytearray(struct.pack("<Q", len(head)) + head + body)
        for kind, arg in raws:
            if kind == "truncate":
                blob = blob[: int(arg * len(blob))]
            elif blob:
                where, byte = arg
                blob[min(int(where * len(blob)), len(blob) - 1)] = byte
        path = root / f"f{next(counter)}.safetensors"
        path.write_bytes(bytes(blob))
        try:
            a = read_adapter(path)
        except SdloraError as e:
            assert "\n" not in str(e) and str(e)
            outcomes["refused"] += 1
            return
        outcomes["read"] += 1
        for m in a.modules.values():
            assert m.rank >= 1 and all(torch.isfinite(t).all() for t in m.tensors.values() if t.is_floating_point())
            assert m.delta().shape == m.shape

    t0 = time.perf_counter()
    check()
    print(f"adapter fuzz: {outcomes} in {time.perf_counter() - t0:.1f}s")
    assert outcomes["read"] > 10 and outcomes["refused"] > 10  # both outcomes exercised
