"""The Train tab of app.py: layout and handlers (the jobs themselves are `jobs.Runner`'s).

The page sends values; every path is decided here: the dataset is the page's upload folder (inside the job's own
folder) or a folder `dataset.folder_in_root` accepts under --data-root, and the run writes only into the job's
folder, its adapter copied into --adapters at the end. A timer brings each open page the shown job's state: jobs
belong to the app, not to a page, so a closed page leaves its job running and a page opened later shows it.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from sdlora.app_train import dataset as D
from sdlora.app_train import form as F
from sdlora.app_train.jobs import DONE, Runner, adapter_name
from sdlora.errors import SdloraError

TICK = 1.0  # seconds between a page's reads of its job


def training_off(host: str, share: bool, allow_remote: bool, adapters: Path | None) -> str | None:
    """Why the Train tab is off, or None: training runs processes and writes files, so it is offered only to this
    machine (a loopback host, no --share link) unless --allow-remote-training, and needs --adapters (where the
    adapters go)."""
    if adapters is None:
        return "Training needs a folder for the adapters it makes: start the app with --adapters DIR."
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if (share or not loopback) and not allow_remote:
        why = "a public --share link" if share else f"--host {host} (other machines can reach it)"
        return (f"Training is off: the app runs with {why}, and a training job runs processes and writes files on "
                "this server. Start it with --allow-remote-training to train anyway.")
    return None


def native_resolution(model: str) -> int:
    """The model's training size without loading it, for the scan report (the built-ins' own, else the family's)."""
    from sdlora import archs
    from sdlora.models import model_arch
    from sdlora.tiny import TINY_RESOLUTION
    from sdlora.toy import TOY_RESOLUTION

    if model == "toy":
        return TOY_RESOLUTION
    if model.startswith("tiny"):
        return TINY_RESOLUTION
    arch = model_arch(model)
    spec = archs.SPECS.get(arch) if arch else None
    return spec.native_resolution if spec else 512


@dataclass
class TrainPage:
    images: gr.Textbox
    upload: gr.File
    check: gr.Button
    caption: gr.Button
    captioner: gr.Dropdown
    report: gr.Markdown
    thumbs: gr.Gallery
    name: gr.Textbox
    essentials: dict  # field name -> widget (model, prompt, steps, ...)
    advanced: dict  # field name -> widget, generated from TrainConfig
    preset: gr.Dropdown
    toml: gr.File
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    status: gr.Markdown
    job: gr.Dropdown
    plot: gr.LinePlot
    sample: gr.Image
    log_button: gr.Button
    log_file: gr.File
    draft: gr.State  # the page's upload folder (a job id), until a job starts from it
    shown: gr.State  # what the page shows of its job, to send only changes

    @property
    def settings(self) -> dict:
        return {n: w for n, w in (self.essentials | self.advanced).items() if n != "model"}


def field_widget(f: F.Field, **kw):
    """The widget of a training setting, from its field: label (the flag), help, default, choices."""
    common = dict(label=f.label, info=f.help, value=f.default, interactive=True, elem_id=f"train-opt-{f.name}") | kw
    if f.kind == "bool":
        return gr.Checkbox(**common)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices) + ([None] if f.optional else []), **common)
    if f.kind == "text":
        return gr.Textbox(**common)
    return gr.Number(precision=0 if f.kind == "int" else None, **common)


def layout(models: list[str], model: str, data_root: Path | None) -> TrainPage:
    fields_ = {f.name: f for f in F.page_fields()}
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Dataset\n" + ("A folder under the app's --data-root, or images uploaded here "
                                           "(with .txt captions beside them, same names)." if data_root else
                                           "Upload the images (with .txt captions beside them, same names)."))
            images = gr.Textbox(label="Folder under --data-root", visible=data_root is not None,
                                placeholder="e.g. my-dog (relative to --data-root)", elem_id="train-images")
            upload = gr.File(label="Upload images and captions", file_count="multiple", type="filepath",
                             file_types=list(D.UPLOAD_SUFFIXES), height=120, elem_id="train-upload")
            check = gr.Button("Check the dataset", elem_id="train-check")
            with gr.Row():  # shown when images of an upload folder lack captions (`sdlora caption`)
                tools = D.captioner()
                captioner = gr.Dropdown(list(tools[1]) if tools else [], value=tools[1][0] if tools else None,
                                        label="captioner", visible=False, interactive=True,
                                        elem_id="train-captioner")
                caption = gr.Button("Caption the images without one", visible=False, elem_id="train-caption")
            report = gr.Markdown(elem_id="train-report")
            thumbs = gr.Gallery(label="What training will see", columns=5, height="auto", elem_id="train-thumbs")
        with gr.Column(scale=1):
            gr.Markdown("### Settings")
            name = gr.Textbox(label="Adapter name (the file in --adapters)", placeholder="default: from the prompt",
                              elem_id="train-name")
            ess = {"model": gr.Dropdown(models, value=model, label="base model", interactive=True,
                                        elem_id="train-model")}
            ids = {"prompt": "train-prompt", "steps": "train-steps", "lr": "train-lr"}
            for n in F.ESSENTIALS[1:]:
                ess[n] = field_widget(fields_[n], **({"elem_id": ids[n]} if n in ids else {}))
            preset = gr.Dropdown([None, *F.presets()], value=None, label="load a preset (configs/)",
                                 interactive=True, elem_id="train-preset")
            toml = gr.File(label="or a TOML file", file_types=[".toml"], type="filepath", height=90,
                           elem_id="train-toml")
            adv = {}
            with gr.Accordion("Advanced (every other `sdlora train` option)", open=False, elem_id="train-advanced"):
                for group, fs in F.advanced_fields().items():
                    with gr.Accordion(group, open=False, elem_id=f"train-group-{group.replace(' ', '-')}"):
                        for f in fs:
                            adv[f.name] = field_widget(f)
        with gr.Column(scale=1):
            gr.Markdown("### Training")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
            status = gr.Markdown(elem_id="train-status")
            job = gr.Dropdown([], value=None, label="job shown", interactive=True, elem_id="train-job")
            plot = gr.LinePlot(x="step", y="loss", color="curve", title="training loss", height=260,
                               elem_id="train-loss-plot")
            sample = gr.Image(label="latest sample grid", type="pil", interactive=False, elem_id="train-sample")
            with gr.Row():
                log_button = gr.Button("Get the log", elem_id="train-log")
                log_file = gr.File(label="log", interactive=False, height=90, elem_id="train-log-file")
    return TrainPage(images, upload, check, caption, captioner, report, thumbs, name, ess, adv, preset, toml, start,
                     stop, resume, status, job, plot, sample, log_button, log_file, gr.State(None), gr.State(None))


def loss_frame(losses: list):
    """The plot's data: each step's loss and its moving average (as the CLI's loss curve draws them)."""
    import pandas as pd

    ema, rows = None, []
    for step, v in losses:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        rows += [(step, v, "loss"), (step, ema, "smoothed")]
    # typed even when empty: the plot keeps the axis types of its first data (an empty frame's would be text)
    return pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": "int64", "loss": "float64",
                                                                         "curve": "string"})


class TrainHandlers:
    """What the Train tab's events do; each returns {component: value} for the components it changes."""

    def __init__(self, page: TrainPage, runner: Runner, models: list[str], data_root: Path | None, refresh):
        self.p, self.runner, self.models, self.data_root = page, runner, models, data_root
        self.refresh = refresh  # (visitor) -> {component: value}: the Generate tab lists the new adapter

    # ---- the dataset
    def _folder(self, text: str, draft: str | None) -> Path:
        if text and text.strip():
            return D.folder_in_root(text, self.data_root)
        if draft is None:
            raise SdloraError("no images yet: upload some" + (" or name a folder under --data-root"
                                                              if self.data_root else ""))
        return self.runner.root / draft / "images"

    def _report(self, folder: Path, values: dict) -> dict:
        p = self.p
        s = {n: values[w] for n, w in p.settings.items()}
        res = int(s["resolution"]) if s.get("resolution") else None
        report = D.scan(folder, s["prompt"] or None, res or native_resolution(values[p.essentials["model"]]),
                        bool(s.get("buckets")), s.get("class_prompt") or None, s.get("trigger") or None,
                        int(s.get("repeats") or 1))
        can = D.captioner() is not None and report.uncaptioned > 0 and folder.parent.parent == self.runner.root
        return {p.report: report.text, p.thumbs: report.thumbs, p.caption: gr.update(visible=can),
                p.captioner: gr.update(visible=can)}

    def upload(self, values: dict) -> dict:
        p = self.p
        draft = values[p.draft]
        try:
            if draft is None:
                draft, _ = self.runner.new_folder()
            notes = D.take_uploads(values[p.upload], self.runner.root / draft / "images")
        except SdloraError as e:
            for f in values[p.upload] or []:
                Path(f).unlink(missing_ok=True)
            return {p.status: f"**Error:** {e}", p.upload: None}
        return self._report(self.runner.root / draft / "images", values) | {
            p.draft: draft, p.upload: None, p.status: "\n\n".join(notes), p.images: ""}

    def check(self, values: dict) -> dict:
        try:
            folder = self._folder(values[self.p.images], values[self.p.draft])
        except SdloraError as e:
            return {self.p.status: f"**Refused:** {e}", self.p.report: "", self.p.thumbs: []}
        return self._report(folder, values) | {self.p.status: ""}

    def caption(self, values: dict) -> dict:
        """Caption the images of the page's upload folder that lack a caption, with `sdlora caption`'s
        caption_folder (the trigger prompt first in each); never a folder under --data-root (read only)."""
        p, tools, draft = self.p, D.captioner(), values[self.p.draft]
        if tools is None or draft is None:
            return {p.status: "captioning needs uploaded images (and `sdlora caption`)"}
        caption_folder, names = tools
        if values[p.captioner] not in names:
            return {p.status: f"**Error:** no captioner '{values[p.captioner]}'; pick one of {', '.join(names)}"}
        folder = self.runner.root / draft / "images"
        try:
            done = caption_folder(folder, captioner=values[p.captioner],
                                  prefix=values[p.essentials["prompt"]] or None, progress=False, log=lambda *_: None)
        except SdloraError as e:
            return {p.status: f"**Error:** {str(e).replace(str(folder), 'the uploads')}"}
        return self._report(folder, values) | {p.status: done.summary().replace(str(folder), "the uploads")}

    # ---- settings
    def load_settings(self, path: str | None, shown_name: str | None) -> dict:
        p = self.p
        if not path:
            return {self.p.status: gr.skip()}
        try:
            values, ignored = F.from_toml(path, shown_name)
        except SdloraError as e:
            return {p.status: f"**Error:** {e}"}
        widgets = p.essentials | p.advanced
        out = {widgets[k]: v for k, v in values.items() if k in widgets}
        if "model" in values and values["model"] not in self.models:
            out.pop(widgets["model"])
            ignored.append(f"model ({values['model']} is not offered here)")
        note = f"settings of {shown_name} loaded" + (f"; not taken: {', '.join(ignored)} (the app sets paths itself)"
                                                     if ignored else "")
        return out | {p.status: note}

    def preset(self, name: str | None) -> dict:
        return self.load_settings(str(F.presets()[name]) if name in F.presets() else None, name)

    def toml(self, path: str | None) -> dict:
        try:
            return self.load_settings(path, Path(path).name if path else None) | {self.p.toml: None}
        finally:
            if path:
                Path(path).unlink(missing_ok=True)

    # ---- jobs
    def start(self, values: dict) -> dict:
        p = self.p
        try:
            text, draft = values[p.images], values[p.draft]
            folder = self._folder(text, draft)  # refused here: nothing read or written
            model = values[p.essentials["model"]]
            if model not in self.models:
                raise SdloraError(f"model '{model}' is not offered by this app; pick one from the list")
            settings = F.settings_from({n: values[w] for n, w in p.settings.items()})
            name = adapter_name(values[p.name] or settings.get("prompt") or "")
            from_root = bool(text and text.strip())
            job_id = self.runner.new_folder()[0] if from_root else draft
            try:
                job = self.runner.submit(job_id, name, model, settings, folder)
            except SdloraError:
                if from_root:
                    shutil.rmtree(self.runner.root / job_id, ignore_errors=True)
                raise
        except SdloraError as e:
            return {p.status: f"**Error:** {e}"}
        return {p.status: job.status(), p.job: gr.update(choices=self.choices(), value=job.id), p.shown: None,
                p.draft: None if not from_root else draft}

    def stop(self, job_id: str | None) -> dict:
        return {self.p.status: self.runner.stop(job_id) if job_id else "no job to stop", self.p.shown: None}

    def resume(self, job_id: str | None) -> dict:
        return {self.p.status: self.runner.resume(job_id) if job_id else "no job to resume", self.p.shown: None}

    def choices(self) -> list[tuple[str, str]]:
        with self.runner.lock:
            return [(f"{j.id} {j.name} ({j.state})", j.id) for j in reversed(self.runner.jobs.values())]

    def opened(self) -> dict:
        """A page opened (or reloaded): it shows the running job, else the last one."""
        job = self.runner.latest()
        return {self.p.job: gr.update(choices=self.choices(), value=job.id if job else None), self.p.shown: None}

    def tick(self, job_id: str | None, shown, visitor: str) -> dict:
        """The shown job as it is now: only what changed since the page's last tick is sent."""
        p, job = self.p, self.runner.get(job_id)
        if job is None:
            return {p.shown: shown}  # nothing changes (Gradio needs one output at least)
        with self.runner.lock:
            version = (job.id, job.state, job.step, len(job.losses), len(job.samples), job.error)
            if shown is not None and tuple(shown) == version:
                return {p.shown: shown}
            out = {p.status: job.status(), p.shown: version, p.job: gr.update(choices=self.choices())}
            if shown is None or tuple(shown)[3] != len(job.losses) or shown[0] != job.id:
                out[p.plot] = loss_frame(list(job.losses))
            if job.samples and (shown is None or shown[4] != len(job.samples) or shown[0] != job.id):
                out[p.sample] = _image(job.samples[-1])
            announce = job.state == DONE and (shown is None or shown[1] != DONE or shown[0] != job.id)
        if announce:
            out |= self.refresh(visitor)  # the Generate tab lists the adapter now
            out[p.status] = (f"{job.status()}: listed in the Generate tab (for {job.model}; when another model is "
                             "loaded there, pick it to blend this one)")
        return out

    def log(self, job_id: str | None) -> dict:
        job = self.runner.get(job_id)
        if job is None or not job.log.is_file():
            return {self.p.status: "no log yet"}
        copy = Path(tempfile.mkdtemp(prefix="sdlora-log-")) / f"job-{job.id}.log"  # Gradio serves a copy
        shutil.copyfile(job.log, copy)
        return {self.p.log_file: str(copy)}


def _image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def wire(demo: gr.Blocks, p: TrainPage, h: TrainHandlers, visitor_of, generate_outputs: list) -> None:
    """The tab's events: light ones off the queue's model slot; the timer per page."""
    every = {*p.settings.values(), p.essentials["model"], p.images, p.draft, p.name}
    reported = [p.status, p.report, p.thumbs, p.caption, p.captioner]
    p.upload.upload(h.upload, {p.upload, *every}, [p.draft, p.upload, p.images, *reported])
    p.check.click(h.check, every, reported)
    p.images.submit(h.check, every, reported)
    p.caption.click(h.caption, {p.captioner, *every}, reported, concurrency_id="model", concurrency_limit=1)
    widgets = list((p.essentials | p.advanced).values())
    p.preset.input(h.preset, p.preset, [*widgets, p.status])
    p.toml.upload(h.toml, p.toml, [*widgets, p.status, p.toml])
    p.start.click(h.start, every, [p.status, p.job, p.shown, p.draft])
    p.stop.click(h.stop, p.job, [p.status, p.shown])
    p.resume.click(h.resume, p.job, [p.status, p.shown])
    p.job.input(lambda j: {p.shown: None}, p.job, [p.shown])
    p.log_button.click(h.log, p.job, [p.log_file, p.status])
    timer = gr.Timer(TICK)

    def tick(job_id, shown, request: gr.Request):
        return h.tick(job_id, shown, visitor_of(request))

    timer.tick(tick, [p.job, p.shown], [p.status, p.shown, p.job, p.plot, p.sample, *generate_outputs],
               show_progress="hidden", concurrency_limit=None)
    demo.load(h.opened, None, [p.job, p.shown])
