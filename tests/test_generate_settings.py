"""The generation settings record (sdlora/infer/settings.py): `sdlora generate`'s flags, the app's widgets, the
checks and the PNG parameters all come from its fields. The app's handlers take the widgets' values by component
(no positions) and make the image `Session.generate` makes for the same settings and blend."""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from sdlora import bounds
from sdlora.cli import build_parser
from sdlora.errors import SdloraError
from sdlora.formats.a1111 import LoraRef, format_parameters, parse_parameters, read_parameters
from sdlora.infer.settings import SCHEDULERS, STRENGTH_RANGE, Settings, widget
from tests.helpers import kohya_fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402


def generate_parser():
    parser = build_parser("generate")
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["generate"]


def flag_of(name: str) -> str:
    return "--size" if name in ("width", "height") else "--" + name.replace("_", "-")


def test_every_field_is_a_generate_flag_with_its_help_and_default():
    p = generate_parser()
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    for f in fields(Settings):
        a = actions[flag_of(f.name)]
        if f.name != "height":  # width and height share --size, which says both
            assert f.metadata["help"] in a.help, f.name
        assert a.required == (f.default is MISSING), f.name
    # the flags' defaults are the record's (guidance: the model family's, once it is loaded)
    assert Settings.from_flags(p.parse_args(["--prompt", "p"])) == Settings(prompt="p")
    assert p.parse_args(["--prompt", "p"]).guidance is None
    args = p.parse_args(["--prompt", "p", "--negative", "n", "--seed", "9", "--steps", "3", "--guidance", "4.5",
                         "--scheduler", "ddim", "--size", "64x48", "--num-images", "2"])
    assert Settings.from_flags(args) == Settings(prompt="p", negative="n", seed=9, steps=3, guidance=4.5,
                                                 scheduler="ddim", width=64, height=48, num_images=2)
    square = Settings.from_flags(p.parse_args(["--prompt", "p", "--size", "40"]))
    assert (square.width, square.height) == (40, 40)


@pytest.mark.parametrize("values,needle", [
    ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
    ({"steps": "20"}, "steps must be a whole number, got '20'"),
    ({"prompt": None}, "prompt must be text, got None"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"steps": bounds.MAX_SAMPLE_STEPS + 1}, f"steps {bounds.MAX_SAMPLE_STEPS + 1} is more than the limit"),
    ({"num_images": bounds.MAX_IMAGES + 1}, f"the number of images {bounds.MAX_IMAGES + 1} is more than the limit"),
    ({"width": 60}, "image size must be a positive multiple of 8, got 60"),
    ({"width": bounds.MAX_SIDE + 8}, f"each side at most {bounds.MAX_SIDE} px"),
    ({"seed": -1}, "seed must be between 0 and 2^63-1"),
    ({"scheduler": "plms"}, "unknown scheduler 'plms'"),
])
def test_one_check_refuses_bad_settings_in_one_line(values, needle):
    with pytest.raises(SdloraError) as e:
        Settings(**({"prompt": "p"} | values))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_widget_values_are_typed_by_the_fields():
    """A slider's 20.0 is the int 20, a whole-number guidance a float: the record holds its fields' types."""
    s = Settings(prompt="p", steps=20.0, width=64.0, height=48.0, num_images=2.0, guidance=7, seed=3.0)
    assert (s.steps, s.width, s.height, s.num_images, s.seed) == (20, 64, 48, 2, 3)
    assert all(type(v) is int for v in (s.steps, s.width, s.height, s.num_images, s.seed))
    assert type(s.guidance) is float and s.guidance == 7.0


def test_the_widgets_ranges_stay_within_the_bounds():
    limits = {"steps": bounds.MAX_SAMPLE_STEPS, "width": bounds.MAX_SIDE, "height": bounds.MAX_SIDE,
              "num_images": bounds.MAX_IMAGES}
    for f in fields(Settings):
        w = widget(f.name)
        if w["kind"] == "slider":
            assert 0 <= w["minimum"] < w["maximum"] <= limits.get(f.name, w["maximum"]), f.name
            if "value" in w:
                assert w["minimum"] <= w["value"] <= w["maximum"], f.name
            Settings(prompt="p", **{f.name: w["minimum"]})  # the range's ends pass the check
            Settings(prompt="p", **{f.name: w["maximum"]})
        if f.default not in (MISSING, None):
            assert w["value"] == f.default, f.name
    assert widget("scheduler")["choices"] == list(SCHEDULERS)
    lo, hi, _ = STRENGTH_RANGE
    assert bounds.strength(lo, "x") == lo and bounds.strength(hi, "x") == hi


def test_image_params_are_the_settings_of_image_i():
    s = Settings(prompt="a, b", negative="c: d", seed=41, steps=3, guidance=6.5, scheduler="euler-a", width=64,
                 height=48, num_images=2)
    loras = [LoraRef("dog", 0.8, 0.5, "0123456789ab")]
    p = s.image_params(1, "tiny", loras, {"Version": "sdlora x"})
    back = parse_parameters(format_parameters(p))
    assert back == p
    assert (back.prompt, back.negative, back.seed, back.steps, back.cfg, back.sampler, back.width, back.height) == (
        s.prompt, s.negative, s.seed + 1, s.steps, s.guidance, SCHEDULERS[s.scheduler][2], s.width, s.height)


# ------------------------------------------------------------------------------------------------ the app


@pytest.fixture(scope="session")
def toy_app(tmp_path_factory):
    """The toy model and an adapter folder of two kohya files (random LoRA pairs on attention and a text-encoder
    layer: what the blend does with them is test_generate's matter, here only that app and session agree)."""
    from sdlora.formats import kohya, layouts
    from sdlora.infer.library import Library
    from sdlora.infer.session import Session

    folder = tmp_path_factory.mktemp("adapters")
    session = Session("toy")
    table = layouts.table_of(session.base.components, session.base.arch)
    for name, seed in (("style", 2), ("tri", 0)):
        tensors = kohya_fixture(table, r"attn2_to_[qv]$|^lora_te_text_model_encoder_layers_0_", seed=seed)
        kohya.save(tensors, folder / f"{name}.safetensors", {"ss_base_model_version": "sd_v1"})
    library = Library(folder)
    library.scan()
    return session, library


@pytest.mark.slow
def test_the_app_handlers_read_named_values_and_make_the_sessions_image(toy_app, tmp_path):
    session, library = toy_app
    outdir = tmp_path / "out"
    with gr.Blocks():
        listed = app.listing(session, library)
        page = app.layout(session, listed, "", ["toy"], False)
        rows = [app.adapter_row(i, r, app.NEW_ROW) for i, r in enumerate(listed)]
    handlers = app.Handlers(page, session, library, outdir, ["toy"], False)
    assert [r.name for r in rows] == ["style", "tri"]
    for name, w in page.settings.items():  # the widgets are the fields'
        assert (w.label, w.elem_id) == (widget(name)["label"], widget(name)["elem_id"])
    asked = dict(prompt="a sks triangle", negative="a circle", seed=3, steps=4.0, guidance=6.5, scheduler="euler",
                 width=32.0, height=32.0, num_images=1.0, clip_skip=None)
    style, tri = rows
    values = {page.settings[n]: v for n, v in asked.items()}
    values |= {style.enable: True, style.advanced: False, style.linked: 0.4, style.te: 1.0, style.unet: 1.0,
               tri.enable: True, tri.advanced: True, tri.linked: 1.0, tri.te: 1.5, tri.unet: 0.5}
    shown = handlers.generate(rows, values)
    assert shown[page.status] == f"1 image(s) saved in {outdir}"
    [(path, caption)] = shown[page.gallery]
    assert caption == "seed 3"
    [(want, params)] = session.generate(Settings(**asked), {"style": (0.4, 0.4), "tri": (1.5, 0.5)})
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(want))
    assert read_parameters(path) == params == parse_parameters(shown[page.params])
    assert "<lora:style:0.4> <lora:tri:1.5:0.5>" in shown[page.params]
    [(plain, _)] = session.generate(Settings(**asked), {})
    assert not np.array_equal(np.asarray(want), np.asarray(plain))  # the blend counts
    # a row's enable box, unticked, leaves its adapter out; prefs are kept by the adapter's key
    values[tri.enable] = False
    assert tri.strengths(values) == (0.0, 0.0) and style.strengths(values) == (0.4, 0.4)
    assert tri.prefs(values) == (True, 1.0, 1.5, 0.5)
    # a bad setting is one line on the page, nothing saved
    values[page.settings["width"]] = 60.0
    assert handlers.generate(rows, values) == {page.status: "**Error:** image size must be a positive multiple of "
                                                            "8, got 60"}
    assert len(list(outdir.glob("*.png"))) == 1
