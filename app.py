"""sdlora app: blend LoRA adapters into a base model and generate images in the browser.

A thin Gradio layer over `sdlora.infer.Session`, the same code `sdlora generate` runs, so the same settings give
the same image here and on the command line. Adapter files are read once (from --adapters DIR or an upload);
moving a strength slider only changes the weights fused at the next generation, from memory.

    python app.py --model tiny --adapters output/        # offline, CPU
    python app.py --adapters ~/loras --port 7861           # SD 1.5 (downloads it once)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sdlora.errors import SdloraError  # noqa: E402
from sdlora.formats.a1111 import format_parameters  # noqa: E402
from sdlora.formats.io import save_png  # noqa: E402
from sdlora.infer.cli import output_paths  # noqa: E402
from sdlora.infer.session import DEFAULT_SCHEDULER, SCHEDULERS, Session, Settings  # noqa: E402
from sdlora.models import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: E402

MAX_ADAPTERS = 8  # adapter rows in the page; uploads beyond this are refused with a message


def describe(session: Session, name: str) -> str:
    r = session.blender.adapters[name]
    f = r.file
    parts = [f"**{name}**", f"trigger: `{f.trigger}`" if f.trigger else "no trigger words in metadata",
             f"base: `{f.base_version or 'unknown'}`", f"{len(r.targets)} modules"]
    if r.unmatched:
        parts.append(f"{len(r.unmatched)} unmatched keys ignored")
    return " · ".join(parts)


def build(session: Session, adapters_dir: Path | None, outdir: Path, models: list[str]) -> gr.Blocks:
    notes = []
    for path in sorted(adapters_dir.glob("*.safetensors")) if adapters_dir else []:
        if len(session.blender.adapters) >= MAX_ADAPTERS:
            notes.append(f"{path.name}: not loaded, the page shows {MAX_ADAPTERS} adapters at most")
            continue
        try:
            session.add(path)
        except SdloraError as e:
            notes.append(str(e))
    native = session.base.native_resolution

    def rows(names: list[str]):
        """Updates for every adapter row: shown with its description for `names`, hidden beyond."""
        out = []
        for i in range(MAX_ADAPTERS):
            if i < len(names):
                out += [gr.update(visible=True), gr.update(value=describe(session, names[i])),
                        gr.update(label=f"enable {names[i]}")]
            else:
                out += [gr.update(visible=False), gr.update(value=""), gr.update()]
        return out

    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        gr.Markdown("# sdlora: blend LoRA adapters and generate")
        names_state = gr.State(list(session.blender.adapters))
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(models, value=session.base.name, label="Base model", allow_custom_value=True,
                                    elem_id="model")
                groups, infos, enables, sliders = [], [], [], []
                for i in range(MAX_ADAPTERS):
                    names = list(session.blender.adapters)
                    with gr.Group(visible=i < len(names)) as g:
                        infos.append(gr.Markdown(describe(session, names[i]) if i < len(names) else "",
                                                 elem_id=f"lora-{i}-info"))
                        with gr.Row():
                            enables.append(gr.Checkbox(value=True, label=f"enable {names[i]}" if i < len(names) else "enable",
                                                       elem_id=f"lora-{i}-enable", scale=0, min_width=120))
                            sliders.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="strength",
                                                     elem_id=f"lora-{i}-strength", scale=3))
                    groups.append(g)
                upload = gr.File(label="Add adapters (.safetensors)", file_types=[".safetensors"],
                                 file_count="multiple", type="filepath", elem_id="upload")
                status = gr.Markdown("\n\n".join(f"**Refused:** {n}" for n in notes), elem_id="status")
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed (-1: random)", elem_id="seed")
                    dice = gr.Button("Random seed", scale=0, elem_id="random-seed")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance (CFG)", elem_id="guidance")
                with gr.Row():
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler",
                                            elem_id="scheduler")
                    width = gr.Slider(8, 1536, value=native, step=8, label="Width", elem_id="width")
                    height = gr.Slider(8, 1536, value=native, step=8, label="Height", elem_id="height")
                    count = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="num-images")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="Results", format="png", columns=2, height="auto", elem_id="gallery")
                params = gr.Textbox(label="Parameters (as saved in each PNG)", lines=3, interactive=False,
                                    elem_id="parameters")

        row_outputs = [c for i in range(MAX_ADAPTERS) for c in (groups[i], infos[i], enables[i])]

        def on_upload(files, names):
            messages = []
            for path in files or []:
                if len(names) >= MAX_ADAPTERS:
                    messages.append(f"**Refused:** {Path(path).name}: not loaded, the page shows {MAX_ADAPTERS} adapters at most")
                    continue
                try:
                    names = names + [session.add(path).file.name]
                    messages.append(f"{Path(path).name}: loaded")
                except SdloraError as e:
                    messages.append(f"**Refused:** {e}")
            return [names, "\n\n".join(messages), None] + rows(names)

        def on_model(name, names):
            try:
                dropped = session.use_model(name)
            except SdloraError as e:
                return [names, f"**Error:** {e}", gr.update(value=session.base.name), gr.update(), gr.update()] + rows(names)
            names = [n for n in session.blender.adapters]
            native = session.base.native_resolution
            msg = "\n\n".join([f"model {name} loaded"] + [f"**Removed:** {d}" for d in dropped])
            return [names, msg, gr.update(), gr.update(value=native), gr.update(value=native)] + rows(names)

        def on_generate(names, prompt, negative, seed, steps, guidance, scheduler, width, height, count, *rest):
            en, st = rest[:MAX_ADAPTERS], rest[MAX_ADAPTERS:]
            strengths = {n: (float(st[i]) if en[i] else 0.0) for i, n in enumerate(names)}
            seed = random.randrange(2**32) if seed is None or seed < 0 else int(seed)
            try:
                settings = Settings(prompt=prompt, negative=negative, seed=seed, steps=int(steps),
                                    guidance=float(guidance), scheduler=scheduler, width=int(width),
                                    height=int(height), num_images=int(count))
                results = session.generate(settings, strengths)
                paths = output_paths(str(outdir), [p.seed for _, p in results])
                texts = [format_parameters(p) for _, p in results]
                for path, (image, _), text in zip(paths, results, texts):
                    save_png(image, path, {"parameters": text})
            except SdloraError as e:
                return gr.update(), gr.update(), f"**Error:** {e}"
            return [(str(p), f"seed {r.seed}") for p, (_, r) in zip(paths, results)], texts[0], \
                f"{len(results)} image(s) saved in {outdir}"

        heavy = dict(concurrency_id="model", concurrency_limit=1)  # one model: requests run one after another
        upload.upload(on_upload, [upload, names_state], [names_state, status, upload] + row_outputs, **heavy)
        model.change(on_model, [model, names_state], [names_state, status, model, width, height] + row_outputs,
                     **heavy)
        dice.click(lambda: -1, None, seed)
        inputs = [names_state, prompt, negative, seed, steps, guidance, scheduler, width, height, count]
        run.click(on_generate, inputs + enables + sliders, [gallery, params, status], **heavy)
        prompt.submit(on_generate, inputs + enables + sliders, [gallery, params, status], **heavy)
    return demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="sdlora app: blend LoRA adapters and generate images.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model to load first (default: {DEFAULT_MODEL}; "
                   "'tiny' is the built-in offline model)")
    p.add_argument("--models", nargs="*", default=[], help="more base models offered in the picker")
    p.add_argument("--adapters", type=Path, help="folder of .safetensors adapters to list")
    p.add_argument("--outdir", type=Path, default=Path("output/app"), help="where generated PNGs are saved")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = p.parse_args(argv)
    try:
        if args.adapters is not None and not args.adapters.is_dir():
            raise SdloraError(f"--adapters {args.adapters}: no such folder")
        session = Session(args.model)
    except SdloraError as e:
        print(f"app: error: {e}", file=sys.stderr)
        return 2
    models = list(dict.fromkeys([args.model, *args.models, *BUILTIN_MODELS, DEFAULT_MODEL]))
    demo = build(session, args.adapters, args.outdir, models)
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
