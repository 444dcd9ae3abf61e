"""The adapter-kind registry (sdlora/lora/kinds/): every kind is complete (key suffixes for its roles, a file round
trip, its layers counted), `--network` is what the registry offers, and no kind name is compared outside it."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from sdlora.config import TrainConfig, make_config
from sdlora.errors import SdloraError
from sdlora.formats import kohya
from sdlora.formats.adapter import AdapterModule, check_module
from sdlora.formats.read import parse
from sdlora.lora import kinds
from sdlora.lora.inject import Network, add_lora, collect_modules, report
from sdlora.lora.targets import find_targets
from sdlora.models import load_base
from tests.helpers import randomize_trainable

SDLORA = Path(__file__).resolve().parent.parent / "sdlora"


def test_network_choices_and_help_come_from_the_registry():
    field = TrainConfig.__dataclass_fields__["network"]
    assert field.metadata["choices"] == kinds.NETWORKS == ("lora", "locon", "loha", "lokr")
    assert all(f"{n} (" in field.metadata["help"] for n in kinds.NETWORKS)
    assert kinds.DORA_BASES == ("lora", "locon")
    with pytest.raises(SdloraError, match="--dora applies to --network lora or locon, not lokr"):
        make_config({"images": ".", "prompt": "x", "network": "lokr", "dora": True})


def test_every_kind_has_a_key_suffix_for_each_of_its_roles():
    assert set(kohya.ROLE_SUFFIX) == set(kinds.KINDS.values())
    for spec in kinds.KINDS.values():
        table = kohya.ROLE_SUFFIX[spec]
        assert set(spec.roles) <= set(table), spec.name
        assert len(set(table.values())) == len(table), spec.name  # one key per role: reading inverts it


def test_an_unknown_kind_is_one_line_naming_the_known_ones():
    known = "lora, locon, loha, lokr, dora, full"
    with pytest.raises(SdloraError, match=f"unknown adapter kind 'oft'; sdlora knows {known}$"):
        kinds.get("oft")
    with pytest.raises(SdloraError, match="--network oft: use one of lora, locon, loha, lokr"):
        kinds.trained("oft")
    with pytest.raises(SdloraError, match="has kind 'oft'"):
        check_module(AdapterModule("x", "oft", {"down": torch.zeros(2, 4)}, 1.0), "f.safetensors")


NETS = [(Network("lora"), {"lora"}), (Network("locon"), {"lora", "locon"}), (Network("loha"), {"loha"}),
        (Network("lokr"), {"lokr"}), (Network("lokr", factor=2), {"lokr"}), (Network("lora", dora=True), {"dora"}),
        (Network("locon", dora=True, conv_rank=2), {"dora"})]  # locon: 1x1 convs and linears stay plain pairs


@pytest.fixture(scope="session")
def base():
    return load_base("tiny")


def _id(x) -> str:
    if not isinstance(x, Network):
        return ""
    return x.kind + "-dora" * x.dora + (f"-conv{x.conv_rank}" if x.conv_rank else "") + \
        (f"-factor{x.factor}" if x.factor != -1 else "")


@pytest.mark.parametrize("net,written", NETS, ids=_id)
def test_each_trained_kind_is_counted_collected_and_read_back_as_itself(base, net, written):
    """Inject as training does and give every parameter a value: the report's expected count (each kind's own
    `trainable_count`) is the trainable parameters; the collected layers are of the kinds `net` writes, and the
    file written from them reads back as the same kinds, tensors and alphas."""
    unet = copy.deepcopy(base.components["unet"])
    add_lora(unet, find_targets(unet, "unet", "default"), 4, 2.0, net)
    randomize_trainable(unet)
    r = report(unet, "unet")
    assert r.modules > 0 and r.expected == r.trainable
    collected = collect_modules(unet)
    assert {k for k, _, _ in collected.values()} == written
    a = parse(kohya.to_tensors(kohya.from_trained({"unet": collected}, base.arch)), {})
    assert len(a.modules) == len(collected)
    for path, (kind, tensors, alpha) in collected.items():
        m = a.modules[kohya.kohya_name("unet", path)]
        assert (m.kind, m.alpha, m.tensors.keys()) == (kind, alpha, tensors.keys())
        assert all(torch.equal(m.tensors[k], v) for k, v in tensors.items())


KIND_NAMES = set(kinds.KINDS)


def _kind_literals(node: ast.AST) -> bool:
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(e, ast.Constant) and e.value in KIND_NAMES for e in elts)


def test_no_kind_name_is_compared_outside_the_registry():
    """`x == "loha"`, `kind in ("lora", "locon")`, `for kind in ("loha", ...)`: only sdlora/lora/kinds/ may."""
    hits = []
    for f in sorted(SDLORA.rglob("*.py")):
        if "lora/kinds" in f.as_posix():
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            sides = [node.left, *node.comparators] if isinstance(node, ast.Compare) else \
                [node.iter] if isinstance(node, (ast.For, ast.comprehension)) else []
            if any(_kind_literals(s) for s in sides):
                hits.append(f"{f.relative_to(SDLORA.parent)}:{getattr(node, 'lineno', '?')}")
    assert not hits
