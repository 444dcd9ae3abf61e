"""app.py in a real browser (Debian's chromium driven by Playwright) against the real server, on the `toy` model.

Adapters are trained with `sdlora train` (two on `toy`, one on `tiny`; in-process through `sdlora.cli.main`, as
the reference images are generated: only the app and the browser need processes of their own) into the folder the
app lists. The page
shows the toy adapters with sliders and the tiny one greyed out with the reason; switching the model to `tiny`
and back scans the folder again (a file added meanwhile appears) and swaps which adapters are usable. The page
then moves one toy adapter's slider and splits the other's into text-encoder and UNet sliders set apart; uploads
make ten rows (more than a fixed page would hold) and keep what the sliders were set to. It generates, and the
image it shows must differ from the base model's and equal, pixel for pixel, what `sdlora generate --lora
FILE:TE:UNET` makes with the same settings; the PNG says <lora:triangle:1.5:0.5> and names the model without a
path. A screenshot is saved under test-artifacts/; with
SDLORA_DOCS_SCREENSHOT=1 it is also written to docs/app.png (the README's picture; its adapters then train for
the quick start's 600 steps, so the picture shows what they learned).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.formats import kohya
from sdlora.formats.a1111 import parse_parameters, read_parameters
from sdlora.formats.file_io import load as load_safetensors
from tests.helpers import run_main

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.subprocess]

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GRADIO_ANALYTICS_ENABLED": "False"}
DOCS = os.environ.get("SDLORA_DOCS_SCREENSHOT") == "1"
PROMPT = "a sks triangle on a white background"
GEN = ["--prompt", PROMPT, "--negative", "a circle", "--seed", "3", "--steps", "12"]
# (text encoder, UNet) per adapter, in the order the app lists them (file names, sorted): style on the linked
# slider, triangle split with its "TE / UNet" box (A1111's <lora:name:te:unet>)
STRENGTHS = {"style": (0.4, 0.4), "triangle": (1.5, 0.5)}
TOY_STEPS = "600" if DOCS else "60"

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (apt-get install chromium)",
                    pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium` to run the browser test",
                allow_module_level=True)


def sdlora(capsys, *args: str) -> str:
    """`sdlora ARGS` in-process (what a subprocess would print, without paying its imports): its stdout."""
    r = run_main(capsys, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_process(log: Path, *args: str, stop_timeout: float = 60):
    """`app.py ARGS` on a free loopback port, its output in `log`: yields (the process, its URL) — `wait_for` the
    URL before using it — and stops the app (SIGTERM) on leaving, also when the test fails."""
    port = free_port()
    with open(log, "w") as fh:
        app = subprocess.Popen([sys.executable, "app.py", *args, "--port", str(port)], cwd=REPO, env=ENV, stdout=fh,
                               stderr=subprocess.STDOUT)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.terminate()
        app.wait(timeout=stop_timeout)


def wait_for(url: str, app: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if app.poll() is not None:
            pytest.fail(f"app.py exited with {app.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer at {url} within {timeout}s:\n{log.read_text()[-3000:]}")


def test_app_lists_adapters_per_model_and_blends_like_the_cli(tmp_path, capsys):
    from playwright.sync_api import expect, sync_playwright

    trained = tmp_path / "trained"
    toy = ["--model", "toy", "--images", str(REPO / "datasets/toy-purple-triangle"), "--steps", TOY_STEPS,
           "--lr", "1e-3"]
    sdlora(capsys, "train", *toy, "--prompt", "a sks triangle", "--seed", "0",
           "--out", str(trained / "triangle.safetensors"))
    sdlora(capsys, "train", *toy, "--prompt", "a zwx triangle", "--seed", "2", "--rank", "2",
           "--out", str(trained / "style.safetensors"))
    sdlora(capsys, "train", "--model", "tiny", "--images", str(REPO / "datasets/dog"), "--prompt", "sks dog",
           "--steps", "4", "--seed", "1", "--out", str(trained / "dog.safetensors"))
    # The app gets its own copy of the folder, deleted before generating: sliders must not need the files.
    shown = tmp_path / "adapters"
    shown.mkdir()
    for name in ("dog", "style", "triangle"):
        shutil.copy(trained / f"{name}.safetensors", shown)
    log, outdir = tmp_path / "app.log", tmp_path / "app-out"
    with app_process(log, "--model", "toy", "--models", "tiny", "--adapters", str(shown), "--outdir", str(outdir),
                     stop_timeout=30) as (app, url):
        # the CLI's images, made while the app starts
        sdlora(capsys, "generate", "--model", "toy", *GEN, "--out", str(tmp_path / "base.png"))
        sdlora(capsys, "generate", "--model", "toy", *GEN, "--out", str(tmp_path / "blend.png"),
               *[a for n, (te, u) in STRENGTHS.items() for a in ("--lora", f"{trained / n}.safetensors:{te:g}:{u:g}")])
        wait_for(url, app, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)

            def usable(i: int, text: str) -> None:
                expect(page.locator(f"#lora-{i}-info")).to_contain_text(text, timeout=120_000)
                # the rows re-render after the status line: wait for the stale text to go, not 5 s
                expect(page.locator(f"#lora-{i}-info")).not_to_contain_text("not for this model", timeout=120_000)
                expect(page.locator(f"#lora-{i}-enable input")).to_be_enabled()
                expect(page.locator(f"#lora-{i}-enable input")).to_be_checked()
                expect(page.locator(f"#lora-{i}.unfit")).to_have_count(0)

            def greyed(i: int, name: str, why: str) -> None:
                info = page.locator(f"#lora-{i}-info")
                expect(info).to_contain_text(f"{name} · not for this model", timeout=120_000)
                expect(info).to_contain_text(why)
                expect(page.locator(f"#lora-{i}-enable input")).to_be_disabled()
                expect(page.locator(f"#lora-{i}.unfit").first).to_be_visible()  # greyed out (Gradio nests the id)

            # On toy: the toy adapters are usable, the tiny one is listed greyed out with the reason.
            greyed(0, "dog", "has shape [32, 32] but the model's is")
            usable(1, "style · trigger: a zwx triangle · base: sd_v1")
            usable(2, "triangle · trigger: a sks triangle")
            expect(page.locator("#lora-3")).to_be_hidden()

            # Switching to tiny scans the folder again (a file added since appears) and swaps what is usable...
            shutil.copy(trained / "dog.safetensors", shown / "late.safetensors")
            page.locator("#model input").fill("tiny")
            page.locator("#model input").press("Enter")
            expect(page.locator("#status")).to_contain_text("model tiny loaded; 2 of 4 adapters fit it",
                                                            timeout=120_000)
            usable(0, "dog · trigger: sks dog")
            greyed(1, "style", "the adapter was trained for a different model")
            greyed(2, "triangle", "the adapter was trained for a different model")
            usable(3, "late · trigger: sks dog")
            # ...and back: the toy adapters return, from memory.
            page.locator("#model input").fill("toy")
            page.locator("#model input").press("Enter")
            expect(page.locator("#status")).to_contain_text("model toy loaded; 2 of 4 adapters fit it",
                                                            timeout=120_000)
            usable(1, "style")
            usable(2, "triangle")
            greyed(3, "late", "has shape")
            shutil.rmtree(shown)

            page.locator("#prompt textarea").fill(GEN[1])
            page.locator("#negative textarea").fill(GEN[3])
            page.locator("#seed input").fill(GEN[5])
            page.locator("#steps input[type=range]").fill(GEN[7])
            (s, _), (te, unet) = STRENGTHS.values()
            page.locator("#lora-1-strength input[type=range]").fill(f"{s:g}")
            expect(page.locator("#lora-1-strength input[type=number]")).to_have_value(f"{s:g}")
            expect(page.locator("#lora-2-te")).to_be_hidden()
            page.locator("#lora-2-advanced input").check()  # the linked slider splits into TE and UNet ones
            expect(page.locator("#lora-2-strength")).to_be_hidden()
            for part, v in (("te", te), ("unet", unet)):
                page.locator(f"#lora-2-{part} input[type=range]").fill(f"{v:g}")
                expect(page.locator(f"#lora-2-{part} input[type=number]")).to_have_value(f"{v:g}")

            # An upload for another architecture is listed greyed out with the reason; one that fits gets a row
            # of its own, and its enable box, unticked, leaves it out of the blend.
            xl = tmp_path / "xl_style.safetensors"
            tensors, md = load_safetensors(trained / "style.safetensors")
            kohya.save(tensors, xl, md | {"ss_base_model_version": "sdxl_base_v1-0"})
            extra = Path(shutil.copy(trained / "style.safetensors", tmp_path / "extra.safetensors"))
            # Any number of adapters gets a row: four more (for tiny, so greyed out here) make ten. Each holds other
            # bytes (its own title): uploads are keyed on their content, and the same bytes are listed once.
            dog_t, dog_md = load_safetensors(trained / "dog.safetensors")
            more = [tmp_path / f"more{k}.safetensors" for k in range(4)]
            for k, f in enumerate(more):
                kohya.save(dog_t, f, dog_md | {"modelspec.title": f"more{k}"})
            page.locator("#upload input[type=file]").set_input_files([str(xl), str(extra), *map(str, more)])
            expect(page.locator("#status")).to_contain_text("more3.safetensors: loaded", timeout=60_000)
            greyed(4, "xl_style", "this adapter is for SDXL")
            usable(5, "extra · trigger: a zwx triangle")
            greyed(9, "more3", "has shape")
            expect(page.locator("#lora-10")).to_have_count(0)
            # the upload re-rendered the rows: what was set on the sliders is kept
            expect(page.locator("#lora-1-strength input[type=number]")).to_have_value(f"{s:g}")
            expect(page.locator("#lora-2-unet input[type=number]")).to_have_value(f"{unet:g}")
            expect(page.locator("#lora-2-strength")).to_be_hidden()
            page.locator("#lora-5-enable input").uncheck()

            page.locator("#generate").click()
            img = page.locator("#gallery img").first
            expect(img).to_be_visible(timeout=120_000)
            expect(page.locator("#parameters textarea")).to_have_value(
                re.compile("<lora:style:0.4> <lora:triangle:1.5:0.5>"))
            shot = REPO / "test-artifacts" / "app.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            if DOCS:
                shutil.copy(shot, REPO / "docs" / "app.png")
            shown_png = page.request.get(img.get_attribute("src")).body()
            params_text = page.locator("#parameters textarea").input_value()
            browser.close()

    in_page = np.asarray(Image.open(io.BytesIO(shown_png)).convert("RGB"))
    blend = np.asarray(Image.open(tmp_path / "blend.png"))
    base = np.asarray(Image.open(tmp_path / "base.png"))
    assert in_page.shape == (32, 32, 3)
    assert np.array_equal(in_page, blend)
    assert not np.array_equal(in_page, base)
    [saved] = outdir.glob("*.png")
    assert read_parameters(saved) == read_parameters(tmp_path / "blend.png") == parse_parameters(params_text)
    model_field = re.search(r"Model: ([^,]*)", params_text).group(1)
    assert model_field == "toy" and "/" not in model_field and "\\" not in model_field
    assert (saved.stat().st_mode & 0o777) == 0o666 & ~_umask()
    # The log says how to share the app with sdlora's flag, not by editing Gradio's launch(), and has no
    # loader noise (progress bars of weight loading) from the model switches.
    text = log.read_text()
    assert "share=True" not in text and "--share" in text
    assert "Loading weights" not in text and "Loading pipeline components" not in text


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u
