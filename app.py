"""sdlora app: blend LoRA adapters into a base model and generate images in the browser, and train new ones.

A thin Gradio layer over `sdlora.infer.Session`, the same code `sdlora generate` runs, so the same settings give
the same image here and on the command line. Every adapter file is read once (from --adapters DIR or an upload);
the folder is scanned again whenever a model loads, and each listed adapter is matched against that model: the
ones that fit get a strength slider (or, with the row's "TE / UNet" box, separate text-encoder and UNet sliders:
A1111's <lora:name:te:unet>), the others stay listed, greyed out, with the reason; there is a row for every adapter,
however many. Moving a slider only changes the weights fused at the next generation, from memory. The model
picker offers the configured models (--model, --models and the built-in ones) only, unless the app is started with
--allow-any-model.

The Train tab (sdlora/app_train/) runs `sdlora train` jobs, one at a time, on images uploaded in the page or a
folder under --data-root; each adapter made lands in --adapters and is listed here. Training is offered on this
machine only (loopback, no --share) unless the app is started with --allow-remote-training.

    python app.py --model toy --adapters output/           # after the README's quick start: offline, CPU
    python app.py --adapters ~/loras --port 7861           # SD 1.5 (downloads it once)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from sdlora.cli import quiet_libraries

quiet_libraries()  # before diffusers/transformers load: the app shows what `sdlora generate` shows, no loader noise
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sdlora import guard  # noqa: E402
from sdlora.app_train import tab as train_tab  # noqa: E402
from sdlora.app_train.jobs import Runner  # noqa: E402
from sdlora.errors import SdloraError  # noqa: E402
from sdlora.formats.a1111 import format_parameters  # noqa: E402
from sdlora.infer.cli import save_images  # noqa: E402
from sdlora.infer.library import MAX_UPLOAD_BYTES, Library  # noqa: E402
from sdlora.infer.session import Session  # noqa: E402
from sdlora.infer.settings import STRENGTH_RANGE, Settings, widget  # noqa: E402
from sdlora.models import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: E402

# greyed-out rows (Gradio nests a group's classes); small images (toy: 32 px) shown as pixels, not blurred
CSS = ".unfit { opacity: 0.45; } .unfit .unfit { opacity: 1; } #gallery img { image-rendering: pixelated; }"


def describe(r) -> str:
    f = r.file
    parts = [f"**{f.name}**", f"trigger: `{f.trigger}`" if f.trigger else "no trigger words in metadata",
             f"base: `{f.base_version or 'unknown'}`", f"{len(r.targets)} modules"]
    if r.unmatched:
        parts.append(f"{len(r.unmatched)} unmatched keys ignored")
    return " · ".join(parts)


def listing(session: Session, library: Library, model: str | None = None, visitor: str = "") -> list[dict]:
    """Load `model` (default: keep the loaded one) and match every file of the library to it, afresh (every
    visitor's uploads too: the model is shared, so each visitor's adapters stay usable); the rows of what `visitor`
    sees (the folder and its own uploads): per file its library key, its name (None when it does not fit), the text
    of its row, and whether it fits."""
    rows = []
    keys, files = list(library.files), list(library.files.values())
    seen = set(library.visible(visitor))
    for key, f, r in zip(keys, files, session.use_model(model or session.base.name, files)):
        if key not in seen:
            continue
        if isinstance(r, SdloraError):
            rows.append({"key": key, "name": None, "fits": False, "label": f.file_name,
                         "text": f"**{f.file_name}** · not for this model: {r}"})
        else:
            rows.append({"key": key, "name": r.file.name, "fits": True, "label": r.file.name, "text": describe(r)})
    return rows


def check_model(name: str, offered: list[str], allow_any: bool) -> None:
    """Refuse a model the app does not offer (unless --allow-any-model), saying nothing about the server's files."""
    if name not in offered and not allow_any:
        raise SdloraError(f"model '{name}' is not offered by this app; pick one from the list (the app loads other "
                          "models when started with --allow-any-model)")


def load_model(session: Session, library: Library, name: str, offered: list[str], allow_any: bool,
               visitor: str = "") -> list[dict]:
    """Load `name` (a no-op for the loaded one), scan the adapter folder again and match every adapter to the model.

    A model that fails to load keeps the one loaded. For a model that is not configured (typed by a client with
    --allow-any-model), the page's message says only that it could not be loaded, not why: the reason could tell
    whether a path exists on the server; the server's log has it."""
    check_model(name, offered, allow_any)
    library.scan()
    try:
        return listing(session, library, name, visitor)
    except SdloraError as e:
        if name in offered:
            raise
        print(f"app: model '{name}' could not be loaded: {e}", file=sys.stderr, flush=True)
        raise SdloraError(f"model '{name}' could not be loaded; the server's log says why") from None


def setting(name: str, **override):
    """The widget of generation setting `name`, as its field describes it (sdlora.infer.settings.widget: label,
    default, range). Interactive: its listeners are attached in the adapter rows' render, which Gradio does not see
    when it decides which components take input."""
    spec = widget(name) | override
    return WIDGETS[spec.pop("kind")](interactive=True, **spec)


WIDGETS = {"text": gr.Textbox, "number": gr.Number, "slider": gr.Slider, "choice": gr.Dropdown}
NEW_ROW = (False, 1.0, 1.0, 1.0)  # an adapter's row before the user sets it: (advanced, strength, te, unet)


@dataclass
class Page:
    """The page's components by name: `layout` builds them, the handlers read and update them by these names."""

    model: gr.Dropdown
    adapters: gr.Column  # the adapter rows, rendered in it (AdapterRow)
    upload: gr.File
    status: gr.Markdown
    settings: dict  # field of sdlora.infer.settings.Settings -> its widget
    dice: gr.Button
    run: gr.Button
    gallery: gr.Gallery
    params: gr.Textbox
    rows: gr.State  # the listed adapters (listing()), one row each, re-rendered when it changes
    prefs: gr.State  # adapter key -> (advanced, strength, te, unet) as last set, kept across re-renders


@dataclass
class AdapterRow:
    """One listed adapter's controls: a linked strength slider, or (advanced) separate text-encoder and UNet
    sliders, as A1111's <lora:name:te:unet>."""

    key: str  # its library key
    name: str | None  # its name in the session's blend; None when it does not fit the model
    enable: gr.Checkbox
    advanced: gr.Checkbox
    linked: gr.Slider
    te: gr.Slider
    unet: gr.Slider

    @property
    def controls(self) -> list:
        """What a generation reads from the row."""
        return [self.enable, *self.settable]

    @property
    def settable(self) -> list:
        """The controls whose values are kept across re-renders (`prefs`), in NEW_ROW's order."""
        return [self.advanced, self.linked, self.te, self.unet]

    def prefs(self, values: dict) -> tuple:
        return tuple(values[c] for c in self.settable)

    def strengths(self, values: dict) -> tuple[float, float]:
        """(text encoder, UNet) strengths the row sets, from an event's values by component."""
        if not values[self.enable]:
            return 0.0, 0.0
        if values[self.advanced]:
            return float(values[self.te]), float(values[self.unet])
        return float(values[self.linked]), float(values[self.linked])


def layout(session: Session, rows0: list[dict], status_text: str, models: list[str], allow_any: bool) -> Page:
    """The page, inside a gr.Blocks: the model picker, a column for the adapter rows, the upload, the generation
    settings (widgets from their fields), the button and the results."""
    native, w = session.base.native_resolution, {}
    gr.Markdown("# sdlora: blend LoRA adapters and generate")
    rows, prefs = gr.State(rows0), gr.State({})
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(models, value=session.base.name, label="Base model", allow_custom_value=allow_any,
                                interactive=True, elem_id="model")
            adapters = gr.Column()  # the rows, rendered below once the other components exist
            upload = gr.File(label="Add adapters (.safetensors)", file_types=[".safetensors"],
                             file_count="multiple", type="filepath", interactive=True, elem_id="upload")
            status = gr.Markdown(status_text, elem_id="status")
        with gr.Column(scale=1):
            w["prompt"], w["negative"] = setting("prompt"), setting("negative")
            with gr.Row():
                w["seed"] = setting("seed")
                dice = gr.Button("Random seed", scale=0, elem_id="random-seed")
            with gr.Row():
                w["steps"] = setting("steps")
                w["guidance"] = setting("guidance", value=session.base.spec.sample_guidance)
            with gr.Row():
                w["scheduler"] = setting("scheduler")
                w["width"], w["height"] = setting("width", value=native), setting("height", value=native)
                w["num_images"] = setting("num_images")
            with gr.Row():
                w["clip_skip"] = setting("clip_skip", value=0)  # 0: the model's own (Settings)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="Results", format="png", columns=2, height="auto", elem_id="gallery")
            params = gr.Textbox(label="Parameters (as saved in each PNG)", lines=3, interactive=False,
                                elem_id="parameters")
    return Page(model, adapters, upload, status, w, dice, run, gallery, params, rows, prefs)


def adapter_row(i: int, r: dict, prefs: tuple) -> AdapterRow:
    """Row i for listed adapter `r` (listing()), starting from `prefs` (advanced, strength, te, unet); greyed out
    with the reason when it does not fit. The enable box starts as whether the adapter fits."""
    fits, (adv, s, te_s, unet_s) = r["fits"], prefs
    lo, hi, step = STRENGTH_RANGE
    with gr.Group(elem_classes=[] if fits else ["unfit"], elem_id=f"lora-{i}"):
        gr.Markdown(r["text"], elem_id=f"lora-{i}-info")
        with gr.Row():
            enable = gr.Checkbox(value=fits, label=f"enable {r['label']}", interactive=fits,
                                 elem_id=f"lora-{i}-enable", scale=0, min_width=120)
            advanced = gr.Checkbox(value=adv, label="TE / UNet", interactive=fits,
                                   elem_id=f"lora-{i}-advanced", scale=0, min_width=100)
            linked = gr.Slider(lo, hi, value=s, step=step, label="strength", interactive=fits,
                               visible=not adv, elem_id=f"lora-{i}-strength", scale=3)
        with gr.Row():
            te = gr.Slider(lo, hi, value=te_s, step=step, label="text encoder", interactive=fits,
                           visible=adv, elem_id=f"lora-{i}-te")
            unet = gr.Slider(lo, hi, value=unet_s, step=step, label="UNet", interactive=fits,
                             visible=adv, elem_id=f"lora-{i}-unet")

    def split(on, s):
        # advanced on: both sliders start from the linked strength; off: the linked one again
        if on:
            return gr.update(visible=False), gr.update(visible=True, value=s), gr.update(visible=True, value=s)
        return gr.update(visible=True), gr.update(visible=False), gr.update(visible=False)

    advanced.input(split, [advanced, linked], [linked, te, unet], queue=False)
    return AdapterRow(r["key"], r["name"] if fits else None, enable, advanced, linked, te, unet)


class Handlers:
    """What the page's events do. Each handler takes its inputs' values by component (Gradio passes a set of inputs
    as one dict) and returns {component: new value}; components it leaves out keep theirs."""

    def __init__(self, page: Page, session: Session, library: Library, outdir: Path, models: list[str],
                 allow_any: bool):
        self.page, self.session, self.library, self.outdir = page, session, library, outdir
        self.models, self.allow_any = models, allow_any

    def generate(self, rows: list[AdapterRow], values: dict) -> dict:
        p = self.page
        asked = {name: values[c] for name, c in p.settings.items()}
        strengths = {r.name: r.strengths(values) for r in rows if r.name is not None}
        seed = asked["seed"]
        asked["seed"] = random.randrange(2**32) if seed is None or seed < 0 else int(seed)
        try:
            results = self.session.generate(Settings(**asked), strengths)
            paths = save_images(str(self.outdir), results, format_parameters)
            texts = [format_parameters(params) for _, params in results]
        except SdloraError as e:
            return {p.status: f"**Error:** {e}"}
        return {p.gallery: [(str(path), f"seed {r.seed}") for path, (_, r) in zip(paths, results)],
                p.params: texts[0], p.status: f"{len(results)} image(s) saved in {self.outdir}"}

    def upload(self, files, visitor: str) -> dict:
        # an upload is this visitor's alone: listed on its page only, read once (keyed on its bytes), its temp file
        # deleted once read, dropped from memory when the page closes (leave)
        messages = []
        for path in files or []:
            why = self.library.upload(path, visitor)
            messages.append(f"**Refused:** {why}" if why else f"{Path(path).name}: loaded")
        p = self.page
        return {p.rows: listing(self.session, self.library, visitor=visitor), p.status: "\n\n".join(messages),
                p.upload: None}

    def switch_model(self, name: str, visitor: str) -> dict:
        p, session = self.page, self.session
        try:
            rows = load_model(session, self.library, name, self.models, self.allow_any, visitor)
        except SdloraError as e:
            return {p.rows: listing(session, self.library, visitor=visitor), p.status: f"**Error:** {e}",
                    p.model: gr.update(value=session.base.name)}
        fit = sum(r["fits"] for r in rows)
        msg = "\n\n".join([f"model {name} loaded; {fit} of {len(rows)} adapters fit it"]
                          + ([notes(self.library)] if self.library.refused else []))
        native = session.base.native_resolution
        # each family's own default guidance (FLUX.1-dev: 3.5, its distilled guidance)
        return {p.rows: rows, p.status: msg, p.settings["width"]: native, p.settings["height"]: native,
                p.settings["guidance"]: session.base.spec.sample_guidance}

    def keeping(self, fn, rows: list[AdapterRow], source):
        """`fn`(the value of `source`, the visitor: Gradio's per-page session)'s outputs, and the prefs updated with
        what the rows show now (the rows are built again when the list changes)."""
        def run_it(request: gr.Request, values: dict) -> dict:
            now = {r.key: r.prefs(values) for r in rows}
            return fn(values[source], visitor_of(request)) | {self.page.prefs: values[self.page.prefs] | now}
        return run_it

    def wire(self, rows: list[AdapterRow]) -> None:
        """The events that read the rows, attached again at each render of them."""
        p, heavy = self.page, dict(concurrency_id="model", concurrency_limit=1)  # one model: one request at a time
        asked = {*p.settings.values(), *(c for r in rows if r.name is not None for c in r.controls)}
        shown = [p.gallery, p.params, p.status]
        p.run.click(lambda values: self.generate(rows, values), asked, shown, **heavy)
        p.settings["prompt"].submit(lambda values: self.generate(rows, values), asked, shown, **heavy)
        kept = {p.prefs, *(c for r in rows for c in r.settable)}
        p.upload.upload(self.keeping(self.upload, rows, p.upload), {p.upload, *kept},
                        [p.rows, p.status, p.upload, p.prefs], **heavy)
        sized = [p.settings[name] for name in ("width", "height", "guidance")]
        p.model.change(self.keeping(self.switch_model, rows, p.model), {p.model, *kept},
                       [p.rows, p.status, p.model, *sized, p.prefs], **heavy)


def notes(library: Library) -> str:
    return "\n\n".join(f"**Refused:** {m}" for m in library.refused.values())


def build(session: Session, library: Library, outdir: Path, models: list[str], allow_any: bool = False,
          runner: Runner | None = None, data_root: Path | None = None, train_off: str | None = None) -> gr.Blocks:
    """The app: `layout`, then the rows of the listed adapters rendered in it (one per adapter, however many; the
    ones that do not fit greyed out with the reason) and the `Handlers` wired to them; and the Train tab, whose
    jobs `runner` runs (without one, the tab says why training is off: `train_off`)."""
    # delete_cache: Gradio's copies of uploads and shown images older than an hour go, and all of them at exit
    with gr.Blocks(title="sdlora", analytics_enabled=False, delete_cache=(600, 3600)) as demo, gr.Tabs():
        with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
            page = layout(session, listing(session, library), notes(library), models, allow_any)
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            if runner is None:
                gr.Markdown(train_off or "Training is off.", elem_id="train-off")
            else:
                def refresh(visitor: str) -> dict:  # a job saved an adapter into --adapters: list it
                    library.scan()
                    return {page.rows: listing(session, library, visitor=visitor)}

                tp = train_tab.layout(models, session.base.name, data_root)
                train_tab.wire(demo, tp, train_tab.TrainHandlers(tp, runner, models, data_root, refresh), visitor_of,
                               [page.rows])
        handlers = Handlers(page, session, library, outdir, models, allow_any)
        with page.adapters:
            @gr.render(inputs=[page.rows, page.prefs], triggers=[page.rows.change, demo.load])
            def adapter_rows(rows, prefs):
                handlers.wire([adapter_row(i, r, prefs.get(r["key"], NEW_ROW)) for i, r in enumerate(rows)])

        page.dice.click(lambda: -1, None, page.settings["seed"])

        def on_leave(request: gr.Request):
            library.forget(visitor_of(request))

        demo.unload(on_leave)
    return demo


def visitor_of(request) -> str:
    """Who is asking: Gradio's per-page session hash (each open page is one visitor)."""
    return getattr(request, "session_hash", None) or ""


def parser() -> argparse.ArgumentParser:
    models = ", ".join(BUILTIN_MODELS)
    p = argparse.ArgumentParser(
        prog="app.py", description="sdlora app: blend LoRA adapters into a base model and generate images in the "
        "browser (http://127.0.0.1:7860 by default).",
        epilog="After the README's quick start: python app.py --model toy --adapters output/")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"base model loaded first (default: {DEFAULT_MODEL}): a hub id, a diffusers folder, a "
                        f".safetensors checkpoint or a built-in offline model ({models})")
    p.add_argument("--models", nargs="*", default=[], metavar="MODEL",
                   help=f"more base models offered in the picker (it always offers --model, {DEFAULT_MODEL} and the "
                        "built-in ones)")
    p.add_argument("--allow-any-model", action="store_true",
                   help="let the picker load any model a visitor types (hub id or server path); off by default, "
                        "the picker offers the configured models only")
    p.add_argument("--adapters", type=Path, metavar="DIR",
                   help="folder of .safetensors adapters to list (scanned again whenever a model loads)")
    p.add_argument("--outdir", type=Path, default=Path("output/app"), metavar="DIR",
                   help="where generated PNGs are saved (default: output/app)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, metavar="N", help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    t = p.add_argument_group("training (the Train tab)")
    t.add_argument("--data-root", type=Path, metavar="DIR",
                   help="server folder whose subfolders the Train tab may train on (default: none, uploads only); "
                        "no path outside it is read")
    t.add_argument("--jobs", type=Path, default=Path("output/app-jobs"), metavar="DIR",
                   help="where training jobs keep their uploads, logs and checkpoints, a folder each "
                        "(default: output/app-jobs); their adapters go to --adapters")
    t.add_argument("--allow-remote-training", action="store_true",
                   help="offer training with --share or a non-loopback --host too (off by default: a job runs "
                        "processes and writes files on this machine)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    models = list(dict.fromkeys([args.model, *args.models, *BUILTIN_MODELS, DEFAULT_MODEL]))
    library = Library(args.adapters)
    try:
        if args.adapters is not None and not args.adapters.is_dir():
            raise SdloraError(f"--adapters {args.adapters}: no such folder; pass the folder your adapters are in "
                              "(e.g. output/ after the quick start)")
        if args.outdir.exists() and not args.outdir.is_dir():
            raise SdloraError(f"--outdir {args.outdir} is a file; pass a folder for the generated images")
        guard.probe_writable(args.outdir, "--outdir")  # before the model loads, as every command checks its outputs
        if args.data_root is not None and not args.data_root.is_dir():
            raise SdloraError(f"--data-root {args.data_root}: no such folder; pass the folder that holds your "
                              "datasets")
        train_off = train_tab.training_off(args.host, args.share, args.allow_remote_training, args.adapters)
        if train_off is None:
            guard.probe_writable(args.jobs, "--jobs")
        print(f"app: loading model {args.model}", flush=True)
        session = Session(args.model)
        library.scan()
    except SdloraError as e:
        print(f"app: error: {e}", file=sys.stderr)
        return 2
    runner = Runner(args.jobs, args.adapters) if train_off is None else None
    demo = build(session, library, args.outdir, models, args.allow_any_model, runner,
                 args.data_root.resolve() if args.data_root else None, train_off)
    # SIGTERM ends the app as Ctrl-C does: a running job is stopped with a resumable checkpoint (Runner.shutdown)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # quiet: Gradio's own banner tells users to edit launch(); the app says what its flags do instead
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   quiet=True, prevent_thread_lock=True, css=CSS,
                                                   max_file_size=MAX_UPLOAD_BYTES)  # refused before it is stored
    print(f"app: running on {demo.local_url}", flush=True)
    if args.share and demo.share_url:
        print(f"app: public link {demo.share_url}", flush=True)
    elif not args.share:
        print("app: to open a public link, start it with --share; to let other machines in, --host 0.0.0.0",
              flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
