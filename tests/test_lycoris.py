"""LyCORIS kinds (LoCon, Tucker LoCon, LoHa, LoKr, DoRA, full diff): read exactly, fused exactly, trained, written in
the layout ComfyUI and A1111 read. Every fused weight is compared with a formula written here (float64, index by
index, not sdlora's maths) and, where the `lycoris-lora` package is installed, with the forward of LyCORIS's own
modules (the format's reference implementation) on the tiny model's real layers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.formats import kohya
from sdlora.formats.read import parse, read_adapter
from sdlora.formats.verify import verify_file
from sdlora.infer.blend import Blender
from sdlora.models import load_base
from tests.helpers import train_tiny

UNET = "lora_unet_"
LIN = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Linear [16, 64], bias
LIN_SQ = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear [16, 16], no bias
CONV = "down_blocks.1.resnets.0.conv1"  # Conv2d [32, 16, 3, 3]
CONV1 = "down_blocks.1.resnets.0.conv_shortcut"  # Conv2d [32, 16, 1, 1]


@pytest.fixture(scope="session")
def base():
    return load_base("tiny")


def kname(path: str) -> str:
    return UNET + path.replace(".", "_")


_G = torch.Generator().manual_seed(0)


def draw(*shape):
    return torch.randn(*shape, generator=_G, dtype=torch.float64) * 0.3


# ---------------------------------------------------------------------------------------------------------------
# independent reference formulas (float64; written from docs/lycoris-and-dit.md, explicit index sums)


def ref_mm(a, b):
    """Σ_k a[o, k] b[k, i] as an explicit broadcast sum."""
    return (a.double()[:, :, None] * b.double()[None, :, :]).sum(1)


def ref_tucker(t, wa, wb):
    """R[o, i, y, x] = Σ_p Σ_q t[p, q, y, x] · wa[p, o] · wb[q, i]."""
    t, wa, wb = t.double(), wa.double(), wb.double()
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:], dtype=torch.float64)
    for p in range(t.shape[0]):
        for q in range(t.shape[1]):
            out += t[p, q][None, None] * wa[p][:, None, None, None] * wb[q][None, :, None, None]
    return out


def ref_kron(w1, w2):
    """ΔW[i·b + p, j·d + q, ...] = W1[i, j] · W2[p, q, ...], built index by index."""
    a, c = w1.shape[:2]
    b, d = w2.shape[:2]
    out = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = w1[i, j].double() * w2.double()
    return out


def ref_dora(w, x, mag):
    """A1111 / ComfyUI at strength 1: magnitude · X / ‖X‖, the norm per input channel for [1, in, ...] and per output
    channel for [out, 1, ...]; returns the fused weight."""
    x = x.double()
    if mag.shape[0] == 1:
        norm = (x ** 2).sum(dim=[d for d in range(x.dim()) if d != 1], keepdim=True).sqrt()
    else:
        norm = (x ** 2).sum(dim=list(range(1, x.dim())), keepdim=True).sqrt()
    return mag.double().reshape(norm.shape) * x / norm


def fused(base, adapter, strength=1.0):
    """The tiny model's weights (and biases) after fusing `adapter` at `strength` with the real Blender."""
    b = copy.deepcopy(base)
    bl = Blender(b)
    r = bl.add(adapter)
    bl.set_strengths({r.file.name: strength})
    return b


def weight(base, path):
    return base.components["unet"].get_submodule(path).weight.detach().double()


# ---------------------------------------------------------------------------------------------------------------
# hand-written files in every layout, against the formulas


def _cases(base, dtype=torch.float64):
    w = {p: weight(base, p) for p in (LIN, LIN_SQ, CONV, CONV1)}
    r = 4

    def rnd(*shape, pos=False):  # drawn, made positive for magnitudes, rounded to the stored dtype
        x = draw(*shape)
        return ((x.abs() + 0.5) if pos else x).to(dtype).double()
    cases = {}
    # LoCon 3x3 (kohya/LyCORIS): down [r, in, 3, 3], up [out, r, 1, 1]
    d, u = rnd(r, 16, 3, 3), rnd(32, r, 1, 1)
    cases["locon"] = (CONV, {"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(2.0)},
                      w[CONV] + 2.0 / r * torch.einsum("ok,kiyx->oiyx", u[:, :, 0, 0], d))
    # Tucker LoCon: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1]
    d, m, u = rnd(r, 16, 1, 1), rnd(r, r, 3, 3), rnd(32, r, 1, 1)
    want = sum(u[:, a, 0, 0][:, None, None, None] * m[a, b][None, None] * d[b, :, 0, 0][None, :, None, None]
               for a in range(r) for b in range(r))
    cases["locon_tucker"] = (CONV, {"lora_down.weight": d, "lora_mid.weight": m, "lora_up.weight": u,
                                    "alpha": torch.tensor(3.0)}, w[CONV] + 3.0 / r * want)
    # LoHa Linear
    t = {k: rnd(*s) for k, s in [("hada_w1_a", (16, r)), ("hada_w1_b", (r, 64)), ("hada_w2_a", (16, r)),
                                 ("hada_w2_b", (r, 64))]}
    cases["loha"] = (LIN, t | {"alpha": torch.tensor(1.0)}, w[LIN] + 1.0 / r * ref_mm(t["hada_w1_a"], t["hada_w1_b"])
                     * ref_mm(t["hada_w2_a"], t["hada_w2_b"]))
    # LoHa conv, plain: 2-D factors [out, r] / [r, in·3·3], reshaped to the weight
    t = {k: rnd(*s) for k, s in [("hada_w1_a", (32, r)), ("hada_w1_b", (r, 144)), ("hada_w2_a", (32, r)),
                                 ("hada_w2_b", (r, 144))]}
    cases["loha_conv"] = (CONV, t | {"alpha": torch.tensor(8.0)}, w[CONV] + (8.0 / r * ref_mm(
        t["hada_w1_a"], t["hada_w1_b"]) * ref_mm(t["hada_w2_a"], t["hada_w2_b"])).reshape(32, 16, 3, 3))
    # LoHa Tucker: [r, out] / [r, in] modes and [r, r, 3, 3] cores
    t = {k: rnd(*s) for k, s in [("hada_w1_a", (r, 32)), ("hada_w1_b", (r, 16)), ("hada_w2_a", (r, 32)),
                                 ("hada_w2_b", (r, 16)), ("hada_t1", (r, r, 3, 3)), ("hada_t2", (r, r, 3, 3))]}
    cases["loha_tucker"] = (CONV, t | {"alpha": torch.tensor(2.0)}, w[CONV] + 2.0 / r * ref_tucker(
        t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * ref_tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]))
    # LoKr Linear [16, 64]: w1 full [4, 4] (left operand), w2 decomposed [4, r2] @ [r2, 16]; scale alpha / r2
    t = {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(4, 2), "lokr_w2_b": rnd(2, 16)}
    cases["lokr"] = (LIN, t | {"alpha": torch.tensor(1.0)}, w[LIN] + 1.0 / 2 * ref_kron(
        t["lokr_w1"], ref_mm(t["lokr_w2_a"], t["lokr_w2_b"])))
    # LoKr both factors full: every loader ignores alpha (scale 1)
    t = {"lokr_w1": rnd(4, 8), "lokr_w2": rnd(4, 8)}
    cases["lokr_full"] = (LIN, t | {"alpha": torch.tensor(123.0)}, w[LIN] + ref_kron(t["lokr_w1"], t["lokr_w2"]))
    # LoKr conv: w1 decomposed (w1_a/w1_b, rank 1 sets the scale), w2 full 4-D [8, 4, 3, 3]
    t = {"lokr_w1_a": rnd(4, 1), "lokr_w1_b": rnd(1, 4), "lokr_w2": rnd(8, 4, 3, 3)}
    cases["lokr_conv"] = (CONV, t | {"alpha": torch.tensor(0.5)}, w[CONV] + 0.5 / 1 * ref_kron(
        ref_mm(t["lokr_w1_a"], t["lokr_w1_b"])[:, :, None, None], t["lokr_w2"]))
    # LoKr Tucker: w2 = tucker(t2, w2_a [r, 8], w2_b [r, 4])
    t = {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(2, 8), "lokr_w2_b": rnd(2, 4), "lokr_t2": rnd(2, 2, 3, 3)}
    cases["lokr_tucker"] = (CONV, t | {"alpha": torch.tensor(4.0)}, w[CONV] + 4.0 / 2 * ref_kron(
        t["lokr_w1"][:, :, None, None], ref_tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])))
    # DoRA, per input channel [1, in] (A1111, ComfyUI, LyCORIS wd_on_output=False; OneTrainer's lora_unet_ + dora)
    d, u, mag = rnd(r, 16), rnd(16, r), rnd(1, 16, pos=True)
    cases["dora_in"] = (LIN_SQ, {"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(2.0),
                                 "dora_scale": mag}, ref_dora(w[LIN_SQ], w[LIN_SQ] + 2.0 / r * ref_mm(u, d), mag))
    # DoRA, per output channel [out, 1] (LyCORIS >= 2025-04) on the square layer: the shape alone says the axis
    d, u, mag = rnd(r, 16), rnd(16, r), rnd(16, 1, pos=True)
    cases["dora_out"] = (LIN_SQ, {"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(4.0),
                                  "dora_scale": mag}, ref_dora(w[LIN_SQ], w[LIN_SQ] + ref_mm(u, d), mag))
    # DoRA on a LoCon 3x3 conv, [1, in, 1, 1]
    d, u, mag = rnd(r, 16, 3, 3), rnd(32, r, 1, 1), rnd(1, 16, 1, 1, pos=True)
    cases["dora_conv"] = (CONV, {"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(1.0),
                                 "dora_scale": mag}, ref_dora(w[CONV], w[CONV] + 1.0 / r * torch.einsum(
                                     "ok,kiyx->oiyx", u[:, :, 0, 0], d), mag))
    # DoRA on LoHa (ComfyUI/LyCORIS "DoHa")
    t = {k: rnd(*s) for k, s in [("hada_w1_a", (16, r)), ("hada_w1_b", (r, 16)), ("hada_w2_a", (16, r)),
                                 ("hada_w2_b", (r, 16))]}
    mag = rnd(1, 16, pos=True)
    x = w[LIN_SQ] + 2.0 / r * ref_mm(t["hada_w1_a"], t["hada_w1_b"]) * ref_mm(t["hada_w2_a"], t["hada_w2_b"])
    cases["doha"] = (LIN_SQ, t | {"alpha": torch.tensor(2.0), "dora_scale": mag}, ref_dora(w[LIN_SQ], x, mag))
    # full diff (no alpha): W + diff; the bias delta diff_b is checked in test_full_diff_moves_the_bias
    diff = rnd(32, 16, 1, 1)
    cases["full"] = (CONV1, {"diff": diff, "diff_b": rnd(32)}, w[CONV1] + diff)
    return cases


CASES = ["locon", "locon_tucker", "loha", "loha_conv", "loha_tucker", "lokr", "lokr_full", "lokr_conv", "lokr_tucker",
         "dora_in", "dora_out", "dora_conv", "doha", "full"]
KINDS = {"locon": "locon", "locon_tucker": "locon", "loha": "loha", "loha_conv": "loha", "loha_tucker": "loha",
         "lokr": "lokr", "lokr_full": "lokr", "lokr_conv": "lokr", "lokr_tucker": "lokr", "dora_in": "dora",
         "dora_out": "dora", "dora_conv": "dora", "doha": "loha", "full": "full"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_layout_fuses_to_its_formula(base, tmp_path, case, dtype):
    path, parts, want = _cases(base, dtype)[case]  # the formula on the values as stored in `dtype`
    name = kname(path)
    tensors = {f"{name}.{k}": v.to(dtype) for k, v in parts.items()}
    tensors[f"{name}.oft_blocks"] = torch.zeros(2)  # a kind sdlora does not apply: reported, never dropped
    f = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(f), {"ss_base_model_version": "sd_v1"})
    a = read_adapter(f)
    assert a.modules[name].kind == KINDS[case]
    assert a.unknown == [f"{name}.oft_blocks"]
    got = weight(fused(base, a), path)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, weight(base, path))
    # written back in the same layout: same keys, same values
    back = kohya.to_tensors(a)
    assert set(back) == set(tensors) - {f"{name}.oft_blocks"}
    assert all(torch.equal(back[k], tensors[k]) for k in back)


def test_full_diff_moves_the_bias(base, tmp_path):
    path, parts, want = _cases(base)["full"]
    name = kname(path)
    save_file({f"{name}.{k}": v.float() for k, v in parts.items()}, str(tmp_path / "f.safetensors"))
    a = read_adapter(tmp_path / "f.safetensors")
    unet = fused(base, a, strength=0.5).components["unet"]
    b0 = base.components["unet"].get_submodule(path).bias.detach().double()
    got = unet.get_submodule(path).bias.detach().double()
    assert torch.allclose(got, b0 + 0.5 * parts["diff_b"], atol=1e-6)
    assert torch.allclose(unet.get_submodule(path).weight.detach().double(), weight(base, path) + 0.5 * parts["diff"],
                          atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# files written by LyCORIS's own modules: sdlora's fused layer must give LyCORIS's forward


LYCO = [  # (module class, layer, kwargs)
    ("LoConModule", CONV, dict(use_tucker=True)),
    ("LoConModule", CONV, {}),
    ("LohaModule", LIN, {}),
    ("LohaModule", CONV, {}),
    ("LohaModule", CONV, dict(use_tucker=True)),
    ("LokrModule", LIN, dict(factor=4)),
    ("LokrModule", LIN, dict(decompose_both=True, lora_dim=1)),
    ("LokrModule", LIN, dict(full_matrix=True)),
    ("LokrModule", CONV, {}),
    ("LokrModule", CONV, dict(use_tucker=True, lora_dim=1, factor=4)),
    ("LoConModule", LIN, dict(weight_decompose=True, wd_on_out=False)),
    ("LoConModule", CONV, dict(weight_decompose=True, wd_on_out=False)),
    ("LoConModule", LIN_SQ, dict(weight_decompose=True, wd_on_out=True)),
    ("LohaModule", LIN, dict(weight_decompose=True, wd_on_out=False)),
    ("FullModule", CONV1, {}),
]


@pytest.mark.parametrize("cls,path,kw", LYCO, ids=[f"{c}-{p.rsplit('.', 1)[-1]}-{'-'.join(k)}" for c, p, k in LYCO])
def test_files_written_by_lycoris_fuse_to_its_forward(base, tmp_path, cls, path, kw):
    lycoris = pytest.importorskip("lycoris.modules")
    layer = copy.deepcopy(base.components["unet"].get_submodule(path)).double()
    in_shape = (2, layer.weight.shape[1], *((5, 5) if layer.weight.dim() == 4 else ()))
    kw = {"lora_dim": 4} | kw
    m = getattr(lycoris, cls)(kname(path), layer, multiplier=1.0, alpha=2, **kw).double()
    g = torch.Generator().manual_seed(len(cls) + len(kw))
    m.apply_to()  # as in training: LyCORIS saves applied modules (a FullModule folds the base weight in here)
    with torch.no_grad():
        for n, p in m.named_parameters():  # every factor non-zero (LyCORIS initialises one of them to 0)
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2
            # a magnitude near ‖W‖ and a full weight near W, as trained ones are
            p.copy_(p * (1 + noise) if n == "dora_scale" else p + noise if cls == "FullModule" else noise)
    sd = m.custom_state_dict() if hasattr(m, "custom_state_dict") else m.state_dict()
    f = tmp_path / "lyco.safetensors"
    save_file({f"{kname(path)}.{k}": v.detach().float().contiguous() for k, v in sd.items()}, str(f))
    x = torch.randn(in_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
        mine = copy.deepcopy(fused(base, read_adapter(f)).components["unet"].get_submodule(path)).double()
        got = mine(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


# ---------------------------------------------------------------------------------------------------------------
# training: the trained layers' forward is what the written file fuses to


NETS = [dict(network="locon"), dict(network="loha"), dict(network="lokr"), dict(network="lokr", rank=1),
        dict(network="lokr", lokr_factor=2, rank=2), dict(network="lora", dora=True),
        dict(network="locon", dora=True, conv_rank=2, conv_alpha=1.0)]


def _net_id(kw):
    return "-".join(f"{v}" if k == "network" else f"{k}{'' if v is True else v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", NETS, ids=_net_id)
def test_trained_layers_forward_equals_the_written_file(base, kw):
    """Inject the adapter as training does, give every adapter parameter a value, write the file as `train` does,
    read it back and fuse it: every adapted layer computes what the training-time layer computes."""
    from sdlora.config import make_config
    from sdlora.lora.inject import add_lora, collect_modules, network_of
    from sdlora.lora.targets import find_targets

    cfg = make_config({"images": ".", "prompt": "x", "rank": 4} | kw)
    rank = cfg.rank
    trained = copy.deepcopy(base)
    unet = trained.components["unet"]
    targets = find_targets(unet, "unet", "default")
    add_lora(unet, targets, rank, 2.0, network_of(cfg))
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(p * (1 + noise) if p.shape[0] == 1 and p.dim() in (2, 4) and "dora" in n else noise)
    f = kohya.from_trained({"unet": collect_modules(unet)}, base.arch)
    a = parse(kohya.to_tensors(f), {})
    kinds = {m.kind for m in a.modules.values()}
    assert kinds <= {"lora", "locon", "loha", "lokr", "dora"} and kinds - {"lora"}
    assert any(n.endswith("resnets_0_conv1") for n in a.modules) == network_of(cfg).convs  # 3x3 convs adapted
    merged = fused(base, a).components["unet"]
    x_lin = torch.randn(2, 7, 128, generator=g)
    for name, layer in [(n, m) for n, m in merged.named_modules() if kohya.kohya_name("unet", n) in a.modules]:
        ref = unet.get_submodule(name)
        w = layer.weight
        x = torch.randn(2, w.shape[1], 6, 6, generator=g) if w.dim() == 4 else x_lin[..., :w.shape[1]]
        with torch.no_grad():
            want, got = ref(x), layer(x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (name, (got - want).abs().max())


@pytest.fixture(scope="session")
def trained_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lyco")
    out = {}
    for name, kw in [("locon", dict(network="locon", conv_rank=2, conv_alpha=1.0)), ("loha", dict(network="loha")),
                     ("lokr", dict(network="lokr")), ("dora", dict(network="lora", dora=True))]:
        out[name] = d / f"{name}.safetensors"
        train_tiny(out[name], steps=3, lr=1e-2, **kw)
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("lycoris-trained")
def test_each_kind_trains_verifies_and_generates(trained_files):
    from sdlora.infer.session import Session, Settings

    settings = Settings(prompt="sks dog", seed=3, steps=3)
    plain = np.asarray(Session("tiny").generate(settings, {})[0][0])
    s = Session("tiny")
    for name, f in trained_files.items():
        a = read_adapter(f)
        assert {m.kind for m in a.modules.values()} - {"lora"} == {"locon" if name == "locon" else name}
        args = json.loads(a.metadata["ss_network_args"])
        assert a.metadata["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"dora": "locon"}.get(name, name)
        assert not a.unknown
        rep = verify_file(f)
        assert rep.ok, rep.problems
        s.add(f)
    for name in trained_files:
        assert np.array_equal(np.asarray(s.generate(settings, {name: 0.0})[0][0]), plain), name
        assert not np.array_equal(np.asarray(s.generate(settings, {name: 1.0})[0][0]), plain), name
    assert json.loads(read_adapter(trained_files["locon"]).metadata["ss_network_args"])["conv_dim"] == "2"
    dora = read_adapter(trained_files["dora"])
    assert all(m.tensors["magnitude"].shape[0] == 1 for m in dora.modules.values())  # per input: A1111 + ComfyUI


@pytest.mark.slow
@pytest.mark.xdist_group("lycoris-trained")
def test_other_kinds_are_refused_where_a_layout_cannot_hold_them(trained_files, tmp_path):
    from sdlora.formats.convert import convert
    from sdlora.inspect_lora import describe
    from sdlora.resize import resize

    loha = trained_files["loha"]
    with pytest.raises(SdloraError, match="loha") as e:
        resize(loha, tmp_path / "r.safetensors", 2)
    assert "\n" not in str(e.value) and not (tmp_path / "r.safetensors").exists()
    for to in ("diffusers", "peft"):
        with pytest.raises(SdloraError, match="--to kohya"):
            convert(loha, tmp_path / ("x-diffusers.safetensors" if to == "diffusers" else "x-peft"), to)
    convert(loha, tmp_path / "k.safetensors", "kohya")  # the kohya/LyCORIS layout holds it: same tensors
    a, b = read_adapter(loha), read_adapter(tmp_path / "k.safetensors")
    assert all(torch.equal(kohya.to_tensors(a)[k], v) for k, v in kohya.to_tensors(b).items())
    kinds = {r["kind"] for r in describe(loha)["groups"]}
    assert kinds == {"loha"}
    resize(trained_files["locon"], tmp_path / "l.safetensors", 1)  # LoCon resizes
    assert {m.rank for m in read_adapter(tmp_path / "l.safetensors").modules.values()} == {1}


def test_dora_needs_a_lora_kind():
    from sdlora.config import make_config

    with pytest.raises(SdloraError, match="--dora"):
        make_config({"images": ".", "prompt": "x", "network": "loha", "dora": True})


@pytest.mark.slow
def test_resume_restores_the_new_layers(tmp_path):
    """A run checkpointed half-way and resumed writes the same adapter as the run without a stop (DoRA on LyCORIS
    modules and LoHa on PEFT layers: every trainable tensor, optimizer state included, is in the checkpoint)."""
    from sdlora.train import ckpt

    for kw in (dict(network="locon", dora=True, conv_rank=2), dict(network="loha")):
        settings = dict(steps=4, save_every=2, keep_last=0, lr=1e-2, **kw)
        a = train_tiny(tmp_path / f"a-{kw['network']}.safetensors", **settings)
        ck = ckpt.checkpoint_root(a.path) / "step-000002"
        b = train_tiny(tmp_path / f"b-{kw['network']}.safetensors", resume=str(ck), **settings)
        ta, tb = kohya.to_tensors(read_adapter(a.path)), kohya.to_tensors(read_adapter(b.path))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), kw
        mid = kohya.to_tensors(read_adapter(ck / "adapter.safetensors"))
        assert not all(torch.equal(ta[k], mid[k]) for k in ta)  # the resumed half trained


def test_peft_dora_files_fuse_to_peft_forward(base, tmp_path):
    """A PEFT DoRA adapter (`lora_magnitude_vector`, one norm per output channel), written by PEFT itself."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = copy.deepcopy(base.components["unet"])
    paths = [LIN, LIN_SQ, CONV]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, use_dora=True, target_modules=paths), unet)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) if "magnitude" in n
                        else 0.2 * torch.randn(p.shape, generator=g))
    sd = get_peft_model_state_dict(unet)
    assert any("magnitude" in k for k in sd)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in sd.items()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2.0,
                                                              "use_dora": True, "target_modules": paths}))
    a = read_adapter(tmp_path / "adapter_model.safetensors")
    assert {m.kind for m in a.modules.values()} == {"dora"} and not a.unknown
    merged = fused(base, a).components["unet"]
    for path in paths:
        w = merged.get_submodule(path).weight
        x = torch.randn(2, w.shape[1], *((6, 6) if w.dim() == 4 else ()), generator=g)
        with torch.no_grad():
            want, got = unet.get_submodule(path)(x), merged.get_submodule(path)(x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (path, (got - want).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_wrapper_files_fuse_to_the_wrapped_unet(base, tmp_path, algo):
    """A whole-UNet file saved by LyCORIS's `create_lycoris` wrapper (`lycoris_<diffusers path>` names, as SimpleTuner
    and ai-toolkit write LyCORIS files): the UNet fused by sdlora computes what LyCORIS's wrapped UNet computes."""
    pytest.importorskip("lycoris")
    from lycoris import LycorisNetwork, create_lycoris

    unet = copy.deepcopy(base.components["unet"])
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D"]})
    net = create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1.0, algo=algo, factor=4)
    net.apply_to()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    net.save_weights(str(tmp_path / "w.safetensors"), torch.float32, None)
    a = read_adapter(tmp_path / "w.safetensors")
    assert not a.unknown and {m.kind for m in a.modules.values()} == {algo}
    assert any("wrapper names" in n for n in a.notes)
    assert any(n.endswith("resnets_0_conv1") for n in a.modules)
    merged = fused(base, a).components["unet"]
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10])
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = unet(x, t, text).sample
        got = merged(x, t, text).sample
        plain = base.components["unet"](x, t, text).sample
    assert not torch.allclose(want, plain, atol=1e-3)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
