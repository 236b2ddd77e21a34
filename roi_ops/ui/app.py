"""The Gradio page of ``roi-ops ui`` and its event handlers.

The handlers are plain functions of an :class:`~roi_ops.ui.engine.Engine` and the page's values (the unit tests
call them directly); :func:`build_app` wires them to the page. Everything the browser sends is checked
(:mod:`roi_ops.ui.layouts`) and a wrong value becomes a ``gr.Error``: a message in the page (and, for the API, the
client's error), never a stack trace. No handler opens a path that came from the browser: an imported layout is
the uploaded file's bytes.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from typing import Any

import gradio as gr

from roi_ops.roictrl_adapter.generate import MAX_LAYOUT_BYTES, parse_layout
from roi_ops.roictrl_adapter.pipeline import validate_layout

from . import layouts
from .canvas import box_canvas
from .engine import DISPLAY_SIDE, Engine, Result, blend_map_images, boxes_overlay

log = logging.getLogger("roi_ops.ui")

#: The queue's name for every event that runs the model: one at a time (the pipeline is not re-entrant).
MODEL_QUEUE = "roictrl-model"
#: Requests that may wait in the queue; more are refused at once (the page says the queue is full).
MAX_QUEUE = 16

CSS = """
#roi-image img, #roi-overlay img, #roi-blend-maps img { image-rendering: pixelated; }
#roi-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def _user_error(e: Exception) -> gr.Error:
    """A validation error for the page: its message only (no stack trace in the page or the server log)."""
    return gr.Error(str(e), title="Not generated", print_exception=False)


def _run(engine: Engine, request: layouts.Request, progress: Any) -> Result:
    """engine.generate with the page's progress bar; an unexpected failure is logged with its stack trace on the
    server and shown in the page as one message."""
    def on_step(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="denoising", unit="steps")

    if progress is not None:
        progress(0, desc="starting")
    try:
        return engine.generate(request, on_step)
    except (ValueError, TypeError) as e:  # the pipeline's own checks
        raise _user_error(e) from None
    except Exception as e:  # noqa: BLE001 -- logged with its trace here, one line in the page
        log.exception("roi-ops ui: generation failed")
        raise gr.Error(f"generation failed ({type(e).__name__}): {e}", print_exception=False) from None


def generate_page(engine: Engine, prompt: Any, negative_prompt: Any, canvas: Any, seed: Any, steps: Any,
                  guidance: Any, beta: Any, scale: Any, progress: Any = None):
    """The page's Generate: (image, boxes overlay, blend maps [(picture, label)], status text)."""
    try:
        layout = layouts.layout_from_canvas(prompt, negative_prompt, canvas)
        request = layouts.make_request(
            validate_layout(layout), seed=seed, steps=steps, guidance_scale=guidance,
            beta=beta, scale=scale, height=engine.height, width=engine.width, vae_factor=engine.vae_factor,
            max_seed=layouts.MAX_UI_SEED,
        )
    except (ValueError, TypeError) as e:
        raise _user_error(e) from None
    result = _run(engine, request, progress)
    status = (f"Generated a {request.width} x {request.height} image with {len(request.instances)} "
              f"instance(s) in {result.seconds:.1f} s (seed {request.seed}, {request.steps} steps).")
    return result.image, boxes_overlay(result), blend_map_images(result), status


def generate_api(engine: Engine, prompt: Any, layout: Any, seed: Any, steps: Any, progress: Any = None):
    """The ``/generate`` endpoint: ``layout`` is the text of a ``roi-ops generate`` layout file; a non-empty
    ``prompt`` overrides its prompt. Guidance, beta and scale are ``roi-ops generate``'s defaults. Returns the
    image."""
    try:
        if not isinstance(layout, str):
            raise ValueError(f"layout must be the layout file's JSON text, got {type(layout).__name__}")
        request = layouts.make_request(
            parse_layout(layout, "layout"), prompt=prompt, seed=seed, steps=steps, height=engine.height,
            width=engine.width, vae_factor=engine.vae_factor,
        )
    except (ValueError, TypeError) as e:
        raise _user_error(e) from None
    return _run(engine, request, progress).image


def export_layout(prompt: Any, negative_prompt: Any, canvas: Any, folder: str):
    """Export: (the layout's JSON text, the path of a new ``layout.json`` under ``folder`` holding it)."""
    try:
        layout = layouts.layout_from_canvas(prompt, negative_prompt, canvas, require_prompt=False)
    except (ValueError, TypeError) as e:
        raise gr.Error(str(e), title="Not exported", print_exception=False) from None
    text = layouts.layout_json(layout)
    path = os.path.join(tempfile.mkdtemp(dir=folder), "layout.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text, path


def import_layout(engine: Engine, content: Any):
    """Import: the uploaded file's bytes -> (prompt, negative prompt, canvas value, its JSON text)."""
    try:
        prompt, negative, canvas = layouts.import_layout(content, engine.height, engine.width)
        text = layouts.layout_json(layouts.layout_from_canvas(prompt, negative, canvas, require_prompt=False))
    except (ValueError, TypeError) as e:
        raise gr.Error(str(e), title="Not imported", print_exception=False) from None
    return prompt, negative, canvas, text


def build_app(engine: Engine, title: str = "roi-ops ui") -> gr.Blocks:
    """The page for ``engine``'s model (loaded once, by the caller; every event shares it, one at a time)."""
    export_folder = tempfile.mkdtemp(prefix="roi-ops-ui-")
    atexit.register(shutil.rmtree, export_folder, ignore_errors=True)  # the exported layout files
    empty = {"width": engine.width, "height": engine.height, "instances": []}
    run_model = dict(concurrency_limit=1, concurrency_id=MODEL_QUEUE)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {title}\nROICtrl instance control: draw boxes, caption them, generate. The model makes "
                    f"{engine.width} x {engine.height} images.")
        with gr.Row():
            with gr.Column(scale=1, min_width=DISPLAY_SIDE + 32):
                canvas = box_canvas(empty, elem_id="roi-canvas")
                with gr.Row():
                    upload = gr.UploadButton("Import layout (.json)", file_types=[".json"], type="binary",
                                             elem_id="roi-import", size="sm")
                    export = gr.Button("Export layout", elem_id="roi-export", size="sm")
                exported = gr.File(label="layout.json (for roi-ops generate --layout)", elem_id="roi-exported",
                                   interactive=False)
                layout_text = gr.Code(label="Layout JSON", language="json", interactive=False,
                                      elem_id="roi-layout-json")
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt (the whole scene)", elem_id="roi-prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="roi-negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=layouts.MAX_UI_SEED,
                                     elem_id="roi-seed")
                    steps = gr.Slider(1, 100, value=layouts.DEFAULT_STEPS, step=1, label="Steps",
                                      elem_id="roi-steps")
                with gr.Row():
                    guidance = gr.Slider(0, 20, value=layouts.DEFAULT_GUIDANCE_SCALE, step=0.5,
                                         label="Guidance scale", info="classifier-free; <= 1 off",
                                         elem_id="roi-guidance")
                    beta = gr.Slider(0, 1, value=layouts.DEFAULT_BETA, step=0.05, label="Beta",
                                     info="the adapter acts on the first beta x steps", elem_id="roi-beta")
                    scale = gr.Slider(0, 2, value=layouts.DEFAULT_SCALE, step=0.05, label="Adapter scale",
                                      info="0 off, 1 as trained", elem_id="roi-scale")
                run = gr.Button("Generate", variant="primary", elem_id="roi-generate")
                status = gr.Markdown(elem_id="roi-status")
                with gr.Row():
                    image = gr.Image(label="Image", type="pil", format="png", interactive=False,
                                     height=DISPLAY_SIDE, elem_id="roi-image")
                    overlay = gr.Image(label="Boxes", type="pil", format="png", interactive=False,
                                       height=DISPLAY_SIDE, elem_id="roi-overlay")
                maps = gr.Gallery(label="Blend maps (each instance's weight; last: the global output's share)",
                                  format="png", columns=4, height=300, object_fit="contain",
                                  elem_id="roi-blend-maps")

        def on_generate(p, n, c, s, st, g, b, sc, progress=gr.Progress()):
            return generate_page(engine, p, n, c, s, st, g, b, sc, progress)

        run.click(on_generate, [prompt, negative, canvas, seed, steps, guidance, beta, scale],
                  [image, overlay, maps, status], api_visibility="private", **run_model)
        export.click(lambda p, n, c: export_layout(p, n, c, export_folder), [prompt, negative, canvas],
                     [layout_text, exported], api_visibility="private")
        upload.upload(lambda content: import_layout(engine, content), upload, [prompt, negative, canvas, layout_text],
                      api_visibility="private")

        # The API endpoint (Gradio's "use via API"): hidden components give it its inputs and output.
        with gr.Group(visible=False):
            api_prompt = gr.Textbox(label="prompt")
            api_layout = gr.Textbox(label="layout")
            api_seed = gr.Number(label="seed", precision=0)
            api_steps = gr.Number(label="steps", precision=0)
            api_image = gr.Image(label="image", type="pil", format="png")
            api_button = gr.Button("generate")

        def on_api(prompt, layout, seed, steps, progress=gr.Progress()):  # the API's parameter names
            return generate_api(engine, prompt, layout, seed, steps, progress)

        api_button.click(on_api, [api_prompt, api_layout, api_seed, api_steps], api_image, api_name="generate",
                         api_description="prompt (overrides the layout's when not empty), layout (the JSON text "
                         "of a roi-ops generate layout file), seed, steps -> the image", **run_model)
    app.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return app


def launch(app: gr.Blocks, host: str, port: int, block: bool = True):
    """Serve ``app`` on ``host:port``: no server-side rendering process, no share link, uploads limited to a
    layout file's size, the footer's API page kept."""
    return app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
                      pwa=False, show_error=False, max_file_size=MAX_LAYOUT_BYTES, css=CSS,
                      footer_links=["api"], prevent_thread_lock=not block, quiet=False)
