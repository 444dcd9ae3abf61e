"""sdlora app: blend LoRA adapters into a base model and generate images in the browser.

A thin Gradio layer over `sdlora.infer.Session`, the same code `sdlora generate` runs, so the same settings give
the same image here and on the command line. Every adapter file is read once (from --adapters DIR or an upload);
the folder is scanned again whenever a model loads, and each listed adapter is matched against that model: the
ones that fit get a strength slider (or, with the row's "TE / UNet" box, separate text-encoder and UNet sliders:
A1111's <lora:name:te:unet>), the others stay listed, greyed out, with the reason; there is a row for every adapter,
however many. Moving a slider only changes the weights fused at the next generation, from memory. The model
picker offers the configured models (--model, --models and the built-in ones) only, unless the app is started with
--allow-any-model.

    python app.py --model toy --adapters output/           # after the README's quick start: offline, CPU
    python app.py --adapters ~/loras --port 7861           # SD 1.5 (downloads it once)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from sdlora.cli import quiet_libraries

quiet_libraries()  # before diffusers/transformers load: the app shows what `sdlora generate` shows, no loader noise
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sdlora import guard  # noqa: E402
from sdlora.errors import SdloraError  # noqa: E402
from sdlora.formats.a1111 import format_parameters  # noqa: E402
from sdlora.infer.cli import save_images  # noqa: E402
from sdlora.infer.library import MAX_UPLOAD_BYTES, Library  # noqa: E402
from sdlora.infer.session import DEFAULT_SCHEDULER, SCHEDULERS, Session, Settings  # noqa: E402
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


def build(session: Session, library: Library, outdir: Path, models: list[str], allow_any: bool = False) -> gr.Blocks:
    rows0 = listing(session, library)
    native = session.base.native_resolution

    def notes() -> str:
        return "\n\n".join(f"**Refused:** {m}" for m in library.refused.values())

    # delete_cache: Gradio's copies of uploads and shown images older than an hour go, and all of them at exit
    with gr.Blocks(title="sdlora", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown("# sdlora: blend LoRA adapters and generate")
        rows_state = gr.State(rows0)  # the listed adapters (listing()), one row each, re-rendered when it changes
        prefs_state = gr.State({})  # adapter key -> (advanced, strength, te, unet) as last set, kept across re-renders
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(models, value=session.base.name, label="Base model", allow_custom_value=allow_any,
                                    interactive=True,
                                    elem_id="model")
                adapters = gr.Column()  # the rows, rendered below once the other components exist
                upload = gr.File(label="Add adapters (.safetensors)", file_types=[".safetensors"],
                                 file_count="multiple", type="filepath", interactive=True, elem_id="upload")
                status = gr.Markdown(notes(), elem_id="status")
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, interactive=True, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, interactive=True, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)", interactive=True, elem_id="seed")
                    dice = gr.Button("Random seed", scale=0, elem_id="random-seed")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", interactive=True, elem_id="steps")
                    guidance = gr.Slider(0, 20, value=session.base.spec.sample_guidance, step=0.5,
                                         label="Guidance (CFG; FLUX.1: distilled guidance)", interactive=True,
                                         elem_id="guidance")
                with gr.Row():
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler",
                                            interactive=True, elem_id="scheduler")
                    width = gr.Slider(8, 1536, value=native, step=8, label="Width", interactive=True, elem_id="width")
                    height = gr.Slider(8, 1536, value=native, step=8, label="Height", interactive=True,
                                       elem_id="height")
                    count = gr.Slider(1, 8, value=1, step=1, label="Images", interactive=True, elem_id="num-images")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Results", format="png", columns=2, height="auto", elem_id="gallery")
                params = gr.Textbox(label="Parameters (as saved in each PNG)", lines=3, interactive=False,
                                    elem_id="parameters")

        heavy = dict(concurrency_id="model", concurrency_limit=1)  # one model: requests run one after another
        # the generation's inputs (interactive=True above, as for the model and the upload: their listeners are
        # attached in the render below, which Gradio does not see when it decides which components take input)
        settings_inputs = [prompt, negative, seed, steps, guidance, scheduler, width, height, count]

        def on_generate(names, prompt, negative, seed, steps, guidance, scheduler, width, height, count, *rows):
            # per listed adapter that fits: enabled, advanced, linked strength, text-encoder and UNet strengths
            strengths = {}
            for i, n in enumerate(names):
                on, advanced, linked, te, unet = rows[5 * i:5 * i + 5]
                te, unet = (float(te), float(unet)) if advanced else (float(linked), float(linked))
                strengths[n] = (te, unet) if on else (0.0, 0.0)
            seed = random.randrange(2**32) if seed is None or seed < 0 else int(seed)
            try:
                settings = Settings(prompt=prompt, negative=negative, seed=seed, steps=int(steps),
                                    guidance=float(guidance), scheduler=scheduler, width=int(width),
                                    height=int(height), num_images=int(count))
                results = session.generate(settings, strengths)
                paths = save_images(str(outdir), results, format_parameters)
                texts = [format_parameters(p) for _, p in results]
            except SdloraError as e:
                return gr.update(), gr.update(), f"**Error:** {e}"
            return [(str(p), f"seed {r.seed}") for p, (_, r) in zip(paths, results)], texts[0], \
                f"{len(results)} image(s) saved in {outdir}"

        def on_upload(files, visitor):
            # an upload is this visitor's alone: listed on its page only, read once (keyed on its bytes), its
            # temp file deleted once read, dropped from memory when the page closes (on_leave)
            messages = []
            for path in files or []:
                why = library.upload(path, visitor)
                messages.append(f"**Refused:** {why}" if why else f"{Path(path).name}: loaded")
            return [listing(session, library, visitor=visitor), "\n\n".join(messages), None]

        def on_model(name, visitor):
            try:
                rows = load_model(session, library, name, models, allow_any, visitor)
            except SdloraError as e:
                return [listing(session, library, visitor=visitor), f"**Error:** {e}",
                        gr.update(value=session.base.name),
                        gr.update(), gr.update(), gr.update()]
            native = session.base.native_resolution
            fit = sum(r["fits"] for r in rows)
            msg = "\n\n".join([f"model {name} loaded; {fit} of {len(rows)} adapters fit it"]
                              + ([notes()] if library.refused else []))
            # each family's own default guidance (FLUX.1-dev: 3.5, its distilled guidance)
            return [rows, msg, gr.update(), gr.update(value=native), gr.update(value=native),
                    gr.update(value=session.base.spec.sample_guidance)]

        with adapters:
            @gr.render(inputs=[rows_state, prefs_state], triggers=[rows_state.change, demo.load])
            def adapter_rows(rows, prefs):
                """One row per listed adapter, however many: a linked strength slider, or (advanced) separate
                text-encoder and UNet sliders, as A1111's <lora:name:te:unet>. Adapters that do not fit are greyed
                out with the reason. The rows are built again when the list changes (an upload, a model load): the
                events that change it also save what the user set per adapter (`prefs`: advanced, strength, te,
                unet) for the new rows to start from; the enable box starts as whether the adapter fits."""
                names, controls, settable = [], [], []
                for i, r in enumerate(rows):
                    fits, (adv, s, te_s, unet_s) = r["fits"], prefs.get(r["key"], (False, 1.0, 1.0, 1.0))
                    with gr.Group(elem_classes=[] if fits else ["unfit"], elem_id=f"lora-{i}"):
                        gr.Markdown(r["text"], elem_id=f"lora-{i}-info")
                        with gr.Row():
                            enable = gr.Checkbox(value=fits, label=f"enable {r['label']}", interactive=fits,
                                                 elem_id=f"lora-{i}-enable", scale=0, min_width=120)
                            advanced = gr.Checkbox(value=adv, label="TE / UNet", interactive=fits,
                                                   elem_id=f"lora-{i}-advanced", scale=0, min_width=100)
                            linked = gr.Slider(-2, 2, value=s, step=0.05, label="strength", interactive=fits,
                                               visible=not adv, elem_id=f"lora-{i}-strength", scale=3)
                        with gr.Row():
                            te = gr.Slider(-2, 2, value=te_s, step=0.05, label="text encoder", interactive=fits,
                                           visible=adv, elem_id=f"lora-{i}-te")
                            unet = gr.Slider(-2, 2, value=unet_s, step=0.05, label="UNet", interactive=fits,
                                             visible=adv, elem_id=f"lora-{i}-unet")

                    def split(on, s):
                        # advanced on: both sliders start from the linked strength; off: the linked one again
                        if on:
                            return gr.update(visible=False), gr.update(visible=True, value=s), \
                                gr.update(visible=True, value=s)
                        return gr.update(visible=True), gr.update(visible=False), gr.update(visible=False)

                    advanced.input(split, [advanced, linked], [linked, te, unet], queue=False)
                    settable += [advanced, linked, te, unet]
                    if fits:
                        names.append(r["name"])
                        controls += [enable, advanced, linked, te, unet]

                def keeping(fn):
                    """`fn`'s outputs (given the visitor: Gradio's per-page session), then the prefs updated with
                    what the rows show now."""
                    def run_it(request: gr.Request, arg, prefs, *values):
                        now = {r["key"]: tuple(values[4 * i:4 * i + 4]) for i, r in enumerate(rows)}
                        return [*fn(arg, visitor_of(request)), prefs | now]
                    return run_it

                names_state = gr.State(names)
                inputs = [names_state, *settings_inputs, *controls]
                run.click(on_generate, inputs, [gallery, params, status], **heavy)
                prompt.submit(on_generate, inputs, [gallery, params, status], **heavy)
                upload.upload(keeping(on_upload), [upload, prefs_state, *settable],
                              [rows_state, status, upload, prefs_state], **heavy)
                model.change(keeping(on_model), [model, prefs_state, *settable],
                             [rows_state, status, model, width, height, guidance, prefs_state], **heavy)

        dice.click(lambda: -1, None, seed)

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
        print(f"app: loading model {args.model}", flush=True)
        session = Session(args.model)
        library.scan()
    except SdloraError as e:
        print(f"app: error: {e}", file=sys.stderr)
        return 2
    demo = build(session, library, args.outdir, models, args.allow_any_model)
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
