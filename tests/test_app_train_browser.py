"""The Train tab in a real browser (Debian's chromium driven by Playwright) against the real app on `toy`
(issue 22): upload the purple-triangle images, read the scan report, set the essentials and two Advanced options,
start 300 steps, watch the status advance, the loss plot fill and a sample grid appear, let the job finish (the
status names the saved file), then in the Generate tab pick the new adapter and generate 4 images; the toy judge
must find purple triangles in most of them. A screenshot of the tab mid-run is saved under test-artifacts/; with
SDLORA_DOCS_SCREENSHOT=1 it is also written to docs/app-train.png (the README's picture).
"""

from __future__ import annotations

import io
import re
import shutil

import pytest
from PIL import Image

from sdlora.eval.toy_judge import judge
from tests.test_app import ARGS, CHROMIUM, DOCS, REPO, app_process, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.subprocess]

TOY = REPO / "datasets" / "toy-purple-triangle"
STEPS = 300
# 300 steps at rank 8: lr 1e-3 drew 6 of 8 purple triangles on one machine and 5 of 8 on another (an AVX512 one), too
# close to "3 of 4" for CPUs whose rounding differs; lr 2e-3 drew 7 of 8 (`sdlora eval -n 8`, 2026-12-03)
LR = "2e-3"
RANK = "8"


def test_train_tab_trains_shows_progress_and_the_adapter_blends_in_generate(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    adapters, jobs = tmp_path / "adapters", tmp_path / "jobs"
    adapters.mkdir()
    log = tmp_path / "app.log"
    with app_process(log, "--model", "toy", "--adapters", str(adapters), "--jobs", str(jobs), "--outdir",
                     str(tmp_path / "out")) as (app, url):
        wait_for(url, app, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#train-images")).to_be_hidden()  # no --data-root: uploads only

            # the dataset: uploads, then the scan report with a thumbnail per image
            page.locator("#train-upload input[type=file]").set_input_files(sorted(map(str, TOY.glob("*.png"))))
            expect(page.locator("#train-status")).to_contain_text("5 file(s) added", timeout=60_000)
            page.locator("#train-prompt textarea").fill("a sks triangle")
            page.locator("#train-check").click()
            report = page.locator("#train-report")
            expect(report).to_contain_text("5 image(s) × 1 repeats, 0 with caption files, prompt 'a sks triangle'")
            expect(report).to_contain_text("00.png  32x32 -> 32x32 (no caption)  'a sks triangle'")
            expect(report).to_contain_text("0 problem(s)")
            expect(page.locator("#train-thumbs img")).to_have_count(5)

            # the essentials, and two options from "Advanced" (generated from TrainConfig)
            page.locator("#train-steps input").fill(str(STEPS))
            page.locator("#train-lr input").fill(LR)
            page.locator("#train-opt-rank input").fill(RANK)
            page.locator("#train-advanced").get_by_text("Advanced").click()
            page.locator("#train-group-monitoring").get_by_text("monitoring").click()
            page.locator("#train-opt-sample_every input").fill("150")
            page.locator("#train-opt-sample_steps input").fill("8")
            page.locator("#train-start").click()

            # progress: the status advances, the loss plot fills, a sample grid appears
            status = page.locator("#train-status")
            expect(status).to_contain_text(re.compile(r"running: step \d+/300, loss \d"), timeout=120_000)
            expect(status).to_contain_text(re.compile(r"step (1[5-9]\d|2\d\d)/300, loss [\d.]+, ETA \d+:\d\d"),
                                           timeout=300_000)
            x_axis = page.locator("#train-loss-plot [aria-roledescription='axis']").first
            axis = re.compile(r"titled .step. for a linear scale with values from \d+ to \d+")
            expect(x_axis).to_have_attribute("aria-label", axis)
            expect(page.locator("#train-sample img")).to_be_visible(timeout=120_000)
            shot = REPO / "test-artifacts" / "app-train.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            if DOCS:
                shutil.copy(shot, REPO / "docs" / "app-train.png")

            # the job belongs to the app: a page opened again (a closed tab) shows it still running, with its curve
            page.reload()
            page.get_by_role("tab", name="Train").click()
            expect(status).to_contain_text(re.compile(r"running: step \d+/300"), timeout=60_000)
            expect(page.locator("#train-job input")).to_have_value("0001 a-sks-triangle (running)")
            expect(x_axis).to_have_attribute("aria-label", axis, timeout=30_000)
            # its log, downloaded from the page
            page.locator("#train-log").click()
            link = page.locator("#train-log-file a").first
            expect(link).to_be_visible(timeout=30_000)
            text = page.request.get(link.get_attribute("href")).text()
            assert text.startswith("$ sdlora train --images=") and "--steps=300" in text and "training:" in text

            # the end: the status names the file, which is in --adapters
            expect(status).to_contain_text(f"done: {STEPS}/{STEPS} steps; saved a-sks-triangle.safetensors in "
                                           "--adapters", timeout=600_000)
            assert (adapters / "a-sks-triangle.safetensors").is_file()
            expect(page.locator("#train-job input")).to_have_value("0001 a-sks-triangle (done)")

            # Generate: the new adapter is listed, fits the model, and blends
            page.get_by_role("tab", name="Generate").click()
            info = page.locator("#lora-0-info")
            expect(info).to_contain_text("a-sks-triangle · trigger: a sks triangle", timeout=60_000)
            page.locator("#lora-0-enable input").check()
            expect(page.locator("#lora-0-enable input")).to_be_enabled()
            page.locator("#prompt textarea").fill("a sks triangle")
            page.locator("#seed input").fill("0")
            page.locator("#num-images input[type=range]").fill("4")
            page.locator("#generate").click()
            imgs = page.locator("#gallery img")
            expect(imgs).to_have_count(4, timeout=180_000)
            expect(page.locator("#parameters textarea")).to_have_value(re.compile("<lora:a-sks-triangle:1>"))
            shown = [page.request.get(imgs.nth(i).get_attribute("src")).body() for i in range(4)]
            browser.close()

    verdicts = [judge(Image.open(io.BytesIO(b)).convert("RGB")) for b in shown]
    hits = sum(v.matches({"colour": "purple", "shape": "triangle"}) for v in verdicts)
    print(f"toy judge: {hits} of 4 purple triangles: {verdicts}")
    assert hits >= 3, verdicts
    assert "Traceback" not in log.read_text()
