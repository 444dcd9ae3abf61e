"""The app's Train tab without a browser (issue 22): its settings come from TrainConfig and go back through the
real `sdlora train` parser; the path rules (a folder outside --data-root is refused before it is looked at, and
nothing is written); upload limits; when training is on; and the job runner with real `sdlora train` processes on
`toy`: two jobs queued run one after the other, Stop + Resume gives the same tensors as an uninterrupted run, and a
job that fails or is killed ends as failed with its error line while the runner goes on. The browser test
(tests/test_app_train_browser.py) drives the same tab in Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import fields, make_dataclass
from pathlib import Path

import gradio as gr
import pytest

from sdlora.app_train import dataset as D
from sdlora.app_train import form as F
from sdlora.app_train import jobs as J
from sdlora.app_train import tab as T
from sdlora.cli import build_parser
from sdlora.config import TrainConfig, _f, make_config
from sdlora.errors import SdloraError
from sdlora.formats.file_io import load
from tests.helpers import assert_same_tensors, run_main, sub_env

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "datasets" / "toy-purple-triangle"
RUN = {"prompt": "a sks triangle", "lr": 1e-3, "no_eval_loss": True}


# ---------------------------------------------------------------- the settings form

def test_every_option_that_is_not_a_path_is_on_the_page_and_a_new_one_appears(monkeypatch):
    shown = {f.name: f for f in F.page_fields()}
    for f in fields(TrainConfig):
        t, _ = F._type(f)
        if f.name in F.APP_SET:
            assert f.name not in shown
        elif t is not str or f.metadata.get("choices") or f.name in F.FREE_TEXT:
            assert f.name in shown, f.name
            assert shown[f.name].help == f.metadata["help"]
        else:  # free text that may name a file: never from a page
            assert f.name not in shown or f.name == "model", f.name
    assert shown["sample_every"].default == F.APP_DEFAULTS["sample_every"]
    advanced = {f.name for fs in F.advanced_fields().values() for f in fs}
    assert advanced.isdisjoint(F.ESSENTIALS) and advanced | set(F.ESSENTIALS) == set(shown)
    # an option added to TrainConfig appears under Advanced with its help; a new free-text field does not
    newer = make_dataclass("Newer", [("new_knob", int, _f(3, "a knob added later", group="training")),
                                     ("new_file", str | None, _f(None, "a file added later"))], bases=(TrainConfig,))
    monkeypatch.setattr(F, "TrainConfig", newer)
    [knob] = [f for f in F.advanced_fields()["training"] if f.name == "new_knob"]
    assert (knob.kind, knob.default, knob.help) == ("int", 3, "a knob added later")
    assert "new_file" not in {f.name for f in F.page_fields()}


def test_page_settings_reach_sdlora_train_through_its_own_parser():
    raw = {f.name: f.default for f in F.page_fields() if f.name != "model"}
    raw |= {"prompt": "-a sks, triangle", "lr": 3e-4, "steps": 7.0, "shuffle_tags": True, "network": "locon",
            "conv_rank": 2, "min_snr_gamma": 5, "optimizer_args": "betas=(0.9,0.99)", "te_lr": None, "seed": 11}
    settings = F.settings_from(raw)
    assert settings == {"prompt": "-a sks, triangle", "lr": 3e-4, "steps": 7, "shuffle_tags": True,
                        "network": "locon", "conv_rank": 2, "min_snr_gamma": 5.0,
                        "optimizer_args": "betas=(0.9,0.99)", "seed": 11, "sample_every": 100}
    args = build_parser("train").parse_args(["train", f"--images={TOY}", *F.to_flags(settings)])
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    assert make_config(given) == make_config(settings | {"images": str(TOY)})
    for path_field in ("images", "out", "resume", "cache_dir", "clip_l"):
        with pytest.raises(SdloraError, match=f"the page cannot set {path_field}"):
            F.settings_from({path_field: "/etc"})
    with pytest.raises(SdloraError, match="--steps must be a whole number"):
        F.settings_from({"steps": 7.5})


def test_a_toml_file_fills_the_page_but_not_its_paths(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('rank = 8\nlr = 2e-4\nimages = "/etc"\nout = "/tmp/x.safetensors"\nmodel = "toy"\n')
    values, ignored = F.from_toml(toml)
    assert values == {"rank": 8, "lr": 2e-4, "model": "toy"} and ignored == ["images", "out"]
    toml.write_text("rank = \n")
    with pytest.raises(SdloraError, match="--config shown.toml: invalid TOML") as e:
        F.from_toml(toml, "shown.toml")
    assert str(tmp_path) not in str(e.value)
    assert "toy-subject.toml" in F.presets()


@pytest.mark.slow  # a toy training with two sample grids
def test_progress_file_reports_start_every_step_and_each_sample_grid(tmp_path, capsys):
    progress = tmp_path / "p.jsonl"
    r = run_main(capsys, "train", "--model", "toy", "--images", TOY, "--prompt", "a sks triangle", "--steps", "3",
                 "--sample-every", "2", "--sample-steps", "1", "--no-eval-loss", "--out", tmp_path / "a.safetensors",
                 "--progress-file", progress, "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [(e["event"], e.get("step")) for e in events] == [
        ("start", None), ("step", 1), ("step", 2), ("sample", 2), ("step", 3), ("sample", 3)]
    assert events[0]["steps"] == 3 and events[0]["start_step"] == 0
    assert all(e["loss"] > 0 and e["lr"] == 1e-4 for e in events if e["event"] == "step")
    assert [Path(e["path"]).name for e in events if e["event"] == "sample"] == ["step-000002.png", "step-000003.png"]
    job = J.Job("0001", tmp_path, "a", "toy", {}, TOY, state=J.RUNNING)
    (tmp_path / "progress.jsonl").write_bytes(progress.read_bytes() + b'{"event": "step", "st')  # a line being written
    job.read_progress()
    assert (job.steps, job.step, [s for s, _ in job.losses], len(job.samples)) == (3, 3, [1, 2, 3], 2)


# ---------------------------------------------------------------- the rules

@pytest.fixture
def tree(tmp_path):
    """--data-root with a dataset in it, a folder beside it (outside), and a link inside pointing out."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(TOY, root / "toy")
    shutil.copytree(TOY, outside / "secret")
    (root / "link").symlink_to(outside / "secret", target_is_directory=True)
    return root, outside


def test_a_folder_outside_data_root_is_refused_whether_it_exists_or_not(tree):
    root, outside = tree
    assert D.folder_in_root("toy", root) == (root / "toy").resolve()
    assert D.folder_in_root(str(root / "toy"), root) == (root / "toy").resolve()
    refused = {}
    for text in ("../outside/secret", "../outside/missing", str(outside / "secret"), "/etc", "link", "toy/../../x"):
        with pytest.raises(SdloraError) as e:
            D.folder_in_root(text, root)
        refused[text] = str(e.value).replace(text, "X")
    assert set(refused.values()) == {"'X' is not inside the app's --data-root; name a folder under it (relative "
                                     "paths are taken from it)"}
    with pytest.raises(SdloraError, match="started without --data-root"):
        D.folder_in_root("toy", None)


def handlers(tmp_path, root):
    with gr.Blocks():
        page = T.layout(["toy"], "toy", root)
    runner = J.Runner(tmp_path / "jobs", tmp_path / "adapters", env=sub_env())
    return page, T.TrainHandlers(page, runner, ["toy"], root, lambda visitor: {}), runner


def start_values(page, images="", draft=None, **settings) -> dict:
    values = {w: getattr(w, "value", None) for w in (page.essentials | page.advanced).values()}
    values |= {page.images: images, page.draft: draft, page.name: "x", page.essentials["prompt"]: "a sks triangle"}
    return values | {page.settings[k]: v for k, v in settings.items()}


def test_start_on_a_folder_outside_data_root_reads_and_writes_nothing(tmp_path, tree):
    root, outside = tree
    page, h, runner = handlers(tmp_path, root)
    before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
    for text in ("../outside/secret", str(outside / "secret"), "link"):
        out = h.start(start_values(page, text))
        assert out[page.status].startswith("**Error:** ") and "is not inside the app's --data-root" in out[page.status]
        out = h.check(start_values(page, text))
        assert "is not inside the app's --data-root" in out[page.status] and out[page.thumbs] == []
    assert runner.jobs == {} and list(runner.root.iterdir()) == []  # no job, no folder
    assert not (tmp_path / "adapters").exists()
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == before
    # inside it: the scan report and a thumbnail per image, without the server's path
    out = h.check(start_values(page, "toy"))
    assert len(out[page.thumbs]) == 5 and out[page.thumbs][0][0].size == (D.THUMB, D.THUMB)
    assert "instance toy: 5 image(s)" in out[page.report] and str(root) not in out[page.report]
    # a model the app does not offer (a path on the server, say) is refused too
    bad = start_values(page, "toy") | {page.essentials["model"]: str(tmp_path)}
    assert "is not offered by this app" in h.start(bad)[page.status] and runner.jobs == {}


def test_uploads_are_bounded_and_their_temp_files_deleted(tmp_path, monkeypatch):
    src = tmp_path / "gradio"
    src.mkdir()

    def temp(name: str, data: bytes = b"x" * 10) -> str:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
        return str(src / name)

    folder = tmp_path / "job" / "images"
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 245)
    monkeypatch.setattr(D, "MAX_FILES", 3)
    monkeypatch.setattr(D, "MAX_JOB_BYTES", 250)
    notes = D.take_uploads([temp("a.png"), temp("b b?.txt"), temp("big.png", b"x" * 246), temp("run.sh"),
                            temp("d.png", b"x" * 240), temp("c.jpg", b"x" * 190), temp("e.png")], folder)
    assert notes == ["big.png: 0.0 MiB is more than the 0 MiB a file may be",
                     "run.sh: not an image or caption file (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp, .txt, "
                     ".caption)",
                     "d.png: a job's uploads may total 0 GiB", "e.png: a job holds at most 3 files",
                     "3 file(s) added; the job's folder holds 3"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "b b_.txt", "c.jpg"]
    assert list(src.iterdir()) == []  # every temp file deleted, taken or refused
    assert D.safe_name("../../etc/passwd.png") == "passwd.png" and D.safe_name("\x00.png") == "_.png"


def test_uploads_land_in_a_job_folder_and_missing_captions_are_offered_to_sdlora_caption(tmp_path):
    page, h, runner = handlers(tmp_path, None)
    temp = tmp_path / "gradio"
    temp.mkdir()
    files = [shutil.copy(p, temp / p.name) for p in sorted(TOY.glob("*.png"))]
    out = h.upload(start_values(page) | {page.upload: files})
    draft = out[page.draft]
    assert out[page.status] == "5 file(s) added; the job's folder holds 5" and list(temp.iterdir()) == []
    assert sorted(p.name for p in (runner.root / draft / "images").iterdir()) == [p.name for p in files]
    assert "0 with caption files" in out[page.report] and len(out[page.thumbs]) == 5
    assert out[page.caption]["visible"] and out[page.captioner]["visible"]  # images without captions
    values = start_values(page, draft=draft) | {page.captioner: "toy"}
    out = h.caption(values)
    assert "5 with caption files" in out[page.report] and not out[page.caption]["visible"]
    captions = {p.name: p.read_text() for p in (runner.root / draft / "images").glob("*.txt")}
    assert len(captions) == 5 and all(c.startswith("a sks triangle, a purple triangle") for c in captions.values())
    assert str(tmp_path) not in out[page.status]
    assert "no captioner 'x'" in h.caption(values | {page.captioner: "x"})[page.status]


@pytest.mark.parametrize("host,share,allow,on", [
    ("127.0.0.1", False, False, True), ("localhost", False, False, True), ("::1", False, False, True),
    ("0.0.0.0", False, False, False), ("192.168.1.5", False, False, False), ("127.0.0.1", True, False, False),
    ("0.0.0.0", True, True, True)])
def test_training_is_on_for_this_machine_only_unless_allowed(tmp_path, host, share, allow, on):
    why = T.training_off(host, share, allow, tmp_path)
    assert (why is None) == on
    if not on:
        assert "--allow-remote-training" in why
    assert "--adapters DIR" in T.training_off(host, share, allow, None)


# ---------------------------------------------------------------- jobs: real `sdlora train` processes

def wait_step(runner: J.Runner, job_id: str, step: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while runner.get(job_id).step < step:
        assert runner.get(job_id).state in (J.QUEUED, J.RUNNING), runner.get(job_id).status()
        assert time.monotonic() < end, runner.get(job_id).status()
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_jobs_queue_and_stop_resume_equals_an_uninterrupted_run(tmp_path):
    runner = J.Runner(tmp_path / "jobs", tmp_path / "adapters", env=sub_env(), poll=0.2)
    settings = RUN | {"steps": 30}
    a = runner.submit(runner.new_folder()[0], "tri", "toy", settings, TOY)
    b = runner.submit(runner.new_folder()[0], "tri", "toy", settings, TOY)
    wait_step(runner, a.id, 10)
    assert (runner.get(a.id).state, runner.get(b.id).state) == (J.RUNNING, J.QUEUED)  # one at a time
    assert "stopping" in runner.stop(a.id)
    runner.wait(a.id)
    assert a.state == J.STOPPED and a.resumable and 10 <= a.step < 30, a.status()
    stopped_at = a.step
    assert a.status() == f"job {a.id} stopped at step {stopped_at}/30; Resume continues it"
    assert "queued" in runner.resume(a.id)  # behind b, which runs now
    runner.wait(b.id)
    runner.wait(a.id)
    assert a.state == b.state == J.DONE, (a.status(), b.status())
    runs = sorted(a.runs + b.runs)
    assert runs == [a.runs[0], b.runs[0], a.runs[1]]  # b ran between a's two runs...
    assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:]))  # ...and never two at once
    assert a.saved.parent == b.saved.parent == (tmp_path / "adapters").resolve()
    assert {b.saved.name, a.saved.name} == {"tri.safetensors", "tri-2.safetensors"}  # nothing replaced
    assert_same_tensors(load(a.saved)[0], load(b.saved)[0])
    assert f"-checkpoints/step-{stopped_at:06d} at step {stopped_at}" in a.log.read_text()  # --resume latest
    assert [s for s, _ in a.losses] == list(range(1, 31)) == [s for s, _ in b.losses]
    assert a.status() == f"job {a.id} done: 30/30 steps; saved {a.saved.name} in --adapters"


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_failing_or_killed_job_ends_with_its_error_line_and_the_next_one_runs(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(TOY, bad)
    (bad / "05.png").write_bytes(b"not a png")
    with gr.Blocks():
        page = T.layout(["toy"], "toy", None)
    runner = J.Runner(tmp_path / "jobs", tmp_path / "adapters", env=sub_env(), poll=0.2)
    h = T.TrainHandlers(page, runner, ["toy"], None, lambda visitor: {})
    failing = runner.submit(runner.new_folder()[0], "bad", "toy", RUN | {"steps": 3}, bad)
    killed = runner.submit(runner.new_folder()[0], "killed", "toy", RUN | {"steps": 500}, TOY)
    after = runner.submit(runner.new_folder()[0], "after", "toy", RUN | {"steps": 2}, TOY)
    runner.wait(failing.id)
    assert failing.state == J.FAILED and failing.error.startswith("sdlora: error: ") and "05.png" in failing.error
    shown = h.tick(failing.id, None, "visitor")
    assert shown[page.status] == f"job {failing.id} failed: {failing.error}"
    wait_step(runner, killed.id, 1)
    os.kill(killed.proc.pid, signal.SIGKILL)  # as the out-of-memory killer ends a process
    runner.wait(killed.id)
    assert killed.state == J.FAILED and killed.error == "the training process was killed (SIGKILL: out of memory?)"
    assert h.tick(killed.id, None, "visitor")[page.status].endswith(killed.error)
    assert runner.wait(after.id).state == J.DONE and after.saved.name == "after.safetensors"
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["after.safetensors"]
