"""``scalegen demo``: a Gradio page over a ``TextTo3DPipeline`` (the optional extra ``scalegen[demo]``).

A prompt box (for an oracle-world model, the grammar's prompts as examples), seed and resolution;
the GLB drawn by Gradio's ``Model3D`` viewer, a download button and the generation time. Requests
that arrive together are batched through one generator call (Gradio's queue, ``batch=True``):
the generator's cost per prompt falls with the batch, as in ``scalegen generate``.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from scalegen.errors import ScalegenError
from scalegen.export.files import slug

MAX_BATCH = 8
RESOLUTIONS = (64, 96, 128, 192, 256)


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a demo of local weights
    try:
        import gradio as gr  # noqa: PLC0415
    except ImportError:
        raise ScalegenError('scalegen demo needs Gradio: pip install "scalegen[demo]"') from None
    return gr


def example_prompts(pipe, n: int = 6) -> list[str]:
    """The world's prompts for an oracle-world model (seen first, then unseen); none for free text."""
    from scalegen.pipeline.pretrained import sample_prompts  # noqa: PLC0415

    return sample_prompts(pipe.cfg, pipe.world, n) if pipe.world is not None else []


def generate_batch(pipe, prompts: list[str], seeds: list, resolutions: list, folder: Path) -> tuple[list, list, list]:
    """One generator call per (seed, resolution) group of a batch of requests. Returns per request the
    GLB path (twice: viewer and download) and a status line; a bad prompt fails only its own request."""
    n = len(prompts)
    paths: list = [None] * n
    status = [""] * n
    groups: dict[tuple, list[int]] = {}
    for i, (p, s, r) in enumerate(zip(prompts, seeds, resolutions)):
        try:
            (p,) = pipe.check_prompts([p])
            pipe.check_world_prompts([p], "this model")
            prompts[i] = p
        except ScalegenError as e:
            status[i] = f"error: {e}"
            continue
        seed = None if s is None or s == "" or int(s) < 0 else int(s)
        groups.setdefault((seed, int(r or 128)), []).append(i)
    for (seed, res), idx in groups.items():
        t0 = time.perf_counter()
        try:
            assets = pipe([prompts[i] for i in idx], seed=seed, resolution=res, batch_size=MAX_BATCH)
        except ScalegenError as e:
            for i in idx:
                status[i] = f"error: {e}"
            continue
        seconds = time.perf_counter() - t0
        for i, asset in zip(idx, assets):
            path = folder / f"{slug(prompts[i])}-{time.time_ns()}.glb"
            asset.save(path)
            paths[i] = str(path)
            status[i] = (f"{len(asset.surface.faces)} faces in {seconds:.2f} s"
                         + (f" (one call for {len(idx)} requests)" if len(idx) > 1 else ""))
    return paths, list(paths), status


def build_demo(pipe, title: str = "scalegen: text to 3D"):
    """The Gradio Blocks app (not launched)."""
    gr = _gradio()
    folder = Path(tempfile.mkdtemp(prefix="scalegen-demo-"))

    def run(prompts, seeds, resolutions):
        return generate_batch(pipe, list(prompts), list(seeds), list(resolutions), folder)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\nModel: `{pipe.source}` ({pipe.cfg.generator.name}, trained with "
                    f"{pipe.cfg.distill.name.upper()}). One forward pass per prompt, no optimisation.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=1)
                seed = gr.Number(label="Seed (-1: the generator's mean)", value=-1, precision=0)
                resolution = gr.Dropdown(choices=list(RESOLUTIONS), value=128, label="Marching-cubes resolution")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                examples = example_prompts(pipe)
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[prompt], label="Prompts of this world")
            with gr.Column():
                view = gr.Model3D(label="Asset (GLB)", elem_id="model", clear_color=[1.0, 1.0, 1.0, 1.0])
                download = gr.DownloadButton(label="Download GLB", elem_id="download")
                info = gr.Textbox(label="Generation", elem_id="info", interactive=False)
        button.click(run, [prompt, seed, resolution], [view, download, info], batch=True, max_batch_size=MAX_BATCH,
                     api_name="generate")
        prompt.submit(run, [prompt, seed, resolution], [view, download, info], batch=True, max_batch_size=MAX_BATCH,
                      api_name=False)
    demo.queue(default_concurrency_limit=1)  # one generator call at a time; the queue batches the waiting ones
    return demo


def launch(pipe, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the demo on ``host:port``; ``block=False`` returns (tests) with the app running."""
    demo = build_demo(pipe)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, share=False,
                show_error=True)
    return demo
