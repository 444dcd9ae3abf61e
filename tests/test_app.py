"""app.py in a real browser (Debian's chromium driven by Playwright) against the real server, on the tiny model.

Two adapters are trained with `sdlora train`; the page moves both strength sliders, generates, and the image it
shows must differ from the base model's and equal, pixel for pixel, what `sdlora generate` makes with the same
settings. A screenshot is saved under test-artifacts/.
"""

from __future__ import annotations

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

from sdlora.formats.io import load as load_safetensors
from sdlora.formats.a1111 import parse_parameters, read_parameters
from sdlora.formats.kohya import save as save_adapter

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
GEN = ["--prompt", "sks dog in the snow", "--negative", "lowres", "--seed", "11", "--steps", "4"]
STRENGTHS = {"dog": 0.6, "style": -1.35}

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (apt-get install chromium)",
                    pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium` to run the browser test",
                allow_module_level=True)


def sdlora(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdlora", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, app: subprocess.Popen, log: Path, timeout: float = 180) -> None:
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


def test_app_blends_two_adapters_like_the_cli(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    trained = tmp_path / "trained"
    jobs = [sdlora("train", "--model", "tiny", "--images", "datasets/dog", "--prompt", prompt, "--steps", "6",
                   "--lr", "1e-2", "--seed", seed, "--out", str(trained / f"{name}.safetensors"))
            for name, prompt, seed in (("dog", "sks dog", "1"), ("style", "zwx painting", "2"))]
    for j in jobs:
        finish(j)
    # The app gets its own copy of the folder, deleted once the page has loaded: sliders must not need the files.
    shown = Path(shutil.copytree(trained, tmp_path / "adapters"))
    port, log, outdir = free_port(), tmp_path / "app.log", tmp_path / "app-out"
    with open(log, "w") as fh:
        app = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--adapters", str(shown),
                                "--port", str(port), "--outdir", str(outdir)],
                               cwd=REPO, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    try:
        cli_base = sdlora("generate", "--model", "tiny", *GEN, "--out", str(tmp_path / "base.png"))
        cli_blend = sdlora("generate", "--model", "tiny", *GEN, "--out", str(tmp_path / "blend.png"),
                           *[a for n, s in STRENGTHS.items() for a in ("--lora", f"{trained / n}.safetensors:{s}")])
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, app, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)
            expect(page.locator("#lora-0-info")).to_contain_text("dog · trigger: sks dog · base: sd_v1")
            expect(page.locator("#lora-1-info")).to_contain_text("style · trigger: zwx painting")
            shutil.rmtree(shown)

            page.locator("#prompt textarea").fill("sks dog in the snow")
            page.locator("#negative textarea").fill("lowres")
            page.locator("#seed input").fill("11")
            page.locator("#steps input[type=range]").fill("4")
            for i, s in enumerate(STRENGTHS.values()):
                page.locator(f"#lora-{i}-strength input[type=range]").fill(str(s))
                expect(page.locator(f"#lora-{i}-strength input[type=number]")).to_have_value(str(s))

            # An adapter for another architecture is refused, with the reason in the page...
            xl = tmp_path / "xl_style.safetensors"
            tensors, md = load_safetensors(trained / "dog.safetensors")
            save_adapter(tensors, xl, md | {"ss_base_model_version": "sdxl_base_v1-0"})
            # An upload that fits gets a row of its own; its enable box, unticked, leaves it out of the blend.
            extra = Path(shutil.copy(trained / "style.safetensors", tmp_path / "extra.safetensors"))
            page.locator("#upload input[type=file]").set_input_files([str(xl), str(extra)])
            expect(page.locator("#status")).to_contain_text("xl_style.safetensors: this adapter is for SDXL",
                                                            timeout=60_000)
            expect(page.locator("#status")).to_contain_text("extra.safetensors: loaded")
            expect(page.locator("#lora-2-info")).to_contain_text("extra · trigger: zwx painting")
            expect(page.locator("#lora-3-info")).to_be_hidden()
            page.locator("#lora-2-enable input").uncheck()

            page.locator("#generate").click()
            img = page.locator("#gallery img").first
            expect(img).to_be_visible(timeout=120_000)
            expect(page.locator("#parameters textarea")).to_have_value(re.compile("<lora:dog:0.6> <lora:style:-1.35>"))
            shot = REPO / "test-artifacts" / "app.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            shown_png = page.request.get(img.get_attribute("src")).body()
            params_text = page.locator("#parameters textarea").input_value()
            browser.close()
        finish(cli_base), finish(cli_blend)
    finally:
        app.terminate()
        app.wait(timeout=30)

    in_page = np.asarray(Image.open(io.BytesIO(shown_png)).convert("RGB"))
    blend = np.asarray(Image.open(tmp_path / "blend.png"))
    base = np.asarray(Image.open(tmp_path / "base.png"))
    assert in_page.shape == (64, 64, 3)
    assert np.array_equal(in_page, blend)
    assert not np.array_equal(in_page, base)
    [saved] = outdir.glob("*.png")
    assert read_parameters(saved) == read_parameters(tmp_path / "blend.png") == parse_parameters(params_text)
