"""``reslab demo``: a Gradio app serving the registered champion models, one tab per dataset."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.processing_utils import save_base64_to_cache

from .faces import FaceFinder
from .inputs import BadImage, decode_image
from .serving import REGISTERED_NAMES, NoModel, Result, ServedModel, default_uri, seen_for_display
from .settings import BATCH_SIZE, QUEUE_SIZE, UPLOAD_LIMIT


@dataclass
class Missing:
    """A dataset tab with no servable model: what to run instead."""

    dataset: str
    message: str


class UploadImage(gr.Image):
    """``gr.Image`` that hands the raw uploaded file to the app, so that a broken, empty or hostile
    file gets a readable message from :func:`decode_image` instead of a stack trace in preprocessing.
    ``is_template`` keeps Gradio's ordinary image widget in the browser."""

    is_template = True

    def preprocess(self, payload: Any) -> str | None:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # pasted or webcam images may come inline
            try:
                return save_base64_to_cache(payload.url, self.GRADIO_CACHE)
            except (ValueError, OSError) as e:
                raise gr.Error(f"The pasted image could not be read ({e}).") from None
        return payload.path


# --------------------------------------------------------------------------- loading


def load_models(specs: list[str] | None) -> list[ServedModel | Missing]:
    """``--model`` URIs (optionally ``dataset=URI``) plus each other dataset's champion, if registered."""
    from train.cli import fail

    served: list[ServedModel | Missing] = []
    replaced: set[str] = set()
    for spec in specs or []:
        dataset, _, uri = spec.partition("=") if "=" in spec and not spec.startswith("models:") else ("", "", spec)
        if dataset and dataset not in REGISTERED_NAMES:
            fail(f"--model {spec}: unknown dataset {dataset!r}; use one of {', '.join(REGISTERED_NAMES)}")
        try:
            model = ServedModel(uri)
        except NoModel as e:
            fail(f"--model {uri}: {e}")
        served.append(model)
        replaced.add(dataset or model.dataset)
    for dataset in REGISTERED_NAMES:
        if dataset in replaced:
            continue
        try:
            served.append(ServedModel(default_uri(dataset)))
        except NoModel as e:
            served.append(Missing(dataset, str(e)))
    return served


# --------------------------------------------------------------------------- prediction


def pct(p: float) -> str:
    return f"{p:.1%}"


def describe(model: ServedModel, r: Result, total_ms: float) -> str:
    """The status panel: answer, per-face table, timings and any conversion notes."""
    first = r.subjects[0]
    best = int(first.probs.argmax())
    what = "largest face" if first.box is not None else "whole image"
    lines = [f"**{model.classes[best]}** {pct(first.probs[best])} ({what})", ""]
    if len(r.subjects) > 1:
        lines += [f"{len(r.subjects)} faces, largest first:", "", "| face | answer | confidence |", "|---|---|---|"]
        for i, s in enumerate(r.subjects, 1):
            k = int(s.probs.argmax())
            lines.append(f"| {i} | {model.classes[k]} | {pct(s.probs[k])} |")
        lines.append("")
    lines.append(f"Inference {r.model_ms:.1f} ms (one forward pass over {r.batch} image{'s' * (r.batch > 1)}), "
                 f"{total_ms:.0f} ms in all.")
    lines += [f"\n> {n}" for n in r.notes]
    return "\n".join(lines)


def make_predict(model: ServedModel, finder: FaceFinder | None):
    """The batched event handler: lists of uploads and toggles in, one list per output component out."""

    def predict(image: list[str | None], gradcam: list[bool]) -> tuple[list, list, list, list]:
        t0 = time.perf_counter()
        labels: list[Any] = [None] * len(image)
        galleries: list[Any] = [[] for _ in image]
        annotated: list[Any] = [None] * len(image)
        status: list[str] = [""] * len(image)
        good, decoded = [], []
        for i, path in enumerate(image):
            if path is None:
                continue  # a cleared input clears the outputs
            try:
                decoded.append(decode_image(path, model.channels))
                good.append(i)
            except BadImage as e:
                status[i] = f"**Cannot classify this file.** {e}"
        if good:
            results = model.classify(decoded, [bool(gradcam[i]) for i in good], finder)
            total_ms = (time.perf_counter() - t0) * 1000
            for i, r in zip(good, results):
                labels[i] = model.top(r.subjects[0].probs)
                items = []
                for n, s in enumerate(r.subjects, 1):
                    k = int(s.probs.argmax())
                    who = f"face {n}" if s.box is not None else "input"
                    items.append((seen_for_display(s.seen), f"{who}: {model.classes[k]} {pct(s.probs[k])}"))
                    if s.cam is not None:
                        items.append((seen_for_display(s.seen, s.cam), f"{who}: Grad-CAM for {model.classes[k]}"))
                galleries[i] = items
                annotated[i] = r.annotated
                status[i] = describe(model, r, total_ms)
        return labels, galleries, annotated, status

    return predict


# --------------------------------------------------------------------------- the UI


def tab_title(model: ServedModel, all_models: list[ServedModel | Missing]) -> str:
    same = [m for m in all_models if isinstance(m, ServedModel) and m.dataset == model.dataset]
    return model.dataset if len(same) == 1 else f"{model.dataset} · {model.card.name or model.uri} v{model.card.version}"


def model_tab(model: ServedModel, title: str, finder: FaceFinder, mlflow_ui: str | None, batch_size: int,
              examples: list[str]) -> None:
    what = "an emotion per face" if model.faces else "what is in the picture"
    gr.Markdown(f"Upload, paste{' or take' if model.faces else ''} a picture; the model says {what} "
                f"({', '.join(model.classes)}).")
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadImage(type="filepath", image_mode=None, label="Image", height=320,
                                sources=["upload", "clipboard", "webcam"] if model.faces else ["upload", "clipboard"])
            cam = gr.Checkbox(value=True, label="Grad-CAM: show where the model looked (last residual stage)",
                              interactive=model.gradcam_ok)
            if examples:
                gr.Examples(examples=examples, inputs=image, label=f"{model.dataset} test-split examples",
                            examples_per_page=12)
        with gr.Column(scale=1):
            label = gr.Label(num_top_classes=3, label="Prediction", elem_classes="prediction")
            status = gr.Markdown(label="status", elem_classes="status")
            seen = gr.Gallery(label="What the model saw" + (" and where it looked" if model.gradcam_ok else ""),
                              columns=2, height="auto", object_fit="contain", allow_preview=True)
            annotated = gr.Image(label="Faces found", visible=model.faces, interactive=False, height=260)
    with gr.Accordion("Model card", open=True):
        gr.Markdown(model.card.markdown(model.config, mlflow_ui))
    gr.on([image.change, cam.change], make_predict(model, finder if model.faces else None), [image, cam],
          [label, seen, annotated, status], batch=True, max_batch_size=batch_size,
          api_name="classify_" + re.sub(r"\W+", "_", title).strip("_"), trigger_mode="always_last")


def build_app(entries: list[ServedModel | Missing], mlflow_ui: str | None = None, batch_size: int = BATCH_SIZE,
              examples: bool = True, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The Gradio Blocks for ``entries`` (a tab each), with a bounded queue."""
    from .examples import dataset_examples

    try:
        finder: FaceFinder | None = FaceFinder()
    except RuntimeError as e:
        print(f"reslab demo: warning: face detection off ({e})", flush=True)
        finder = None
    served = [e for e in entries if isinstance(e, ServedModel)]
    with gr.Blocks(title="reslab demo", analytics_enabled=False) as app:
        gr.Markdown("# reslab demo\nResNets trained with reslab, served from the MLflow model registry.")
        if not served:
            gr.Markdown("## No registered model yet\nRun `make run` (about 20 minutes: it tunes and registers the "
                        "champions of both CIFAR-10 and FER-2013), or train one model with "
                        "`reslab train --dataset cifar10 --register cifar10-resnet`, then start `reslab demo` again.",
                        elem_id="no-model")
        with gr.Tabs():
            for e in entries:
                if isinstance(e, Missing):
                    with gr.Tab(e.dataset):
                        gr.Markdown(f"### No {e.dataset} model registered\n{e.message}", elem_classes="missing")
                    continue
                title = tab_title(e, entries)
                with gr.Tab(title):
                    model_tab(e, title, finder, mlflow_ui, batch_size, dataset_examples(e.dataset) if examples else [])
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    """Block until the server answers (raise TimeoutError with the URL if it never does)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.5)


THEME = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str | int = UPLOAD_LIMIT, block: bool = True) -> gr.Blocks:
    # _frontend=False skips Gradio's 3-second reachability probe, which fails on a busy machine;
    # wait_until_up checks the same thing with patience.
    app.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size, quiet=True,
               prevent_thread_lock=True, show_error=True, ssr_mode=False, theme=gr.themes.Default(**THEME),
               _frontend=False)
    wait_until_up(app.local_url)
    if block:
        print(f"reslab demo running on {app.local_url}" + (f" and {app.share_url}" if app.share_url else "")
              + "  (Ctrl+C to stop)", flush=True)
        try:
            app.block_thread()
        except KeyboardInterrupt:
            pass
    return app
