"""``reslab demo``: a Gradio app serving the registered champion models, one tab per dataset."""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.processing_utils import save_base64_to_cache
from gradio_client.utils import is_http_url_like

from .faces import FaceFinder
from train.images import BadImage, decode_image
from .serving import REGISTERED_NAMES, NoModel, Result, ServedModel, default_uri, seen_for_display
from .settings import BATCH_SIZE, QUEUE_SIZE, UPLOAD_LIMIT

log = logging.getLogger("reslab.demo")

# What a user is told when the image is not a file this server received as an upload (a server path,
# a symlink out of the upload folder, a URL): one message, so it says nothing about what exists.
NOT_AN_UPLOAD = "The image did not arrive as an upload to this page; please upload it again."
# Anything else that goes wrong with one upload: the details go to the server log, never to the page.
FAILED = "Something went wrong with this image on the server; please try another one."
# Pasted and webcam images may come inline as data: URLs, which the upload limit (--max-file-size)
# does not see: about 10 MB of image in base64.
DATA_URL_LIMIT = 14 * 1024 * 1024
# Uploads and webcam photos are deleted from Gradio's cache: every 5 minutes, those older than 15.
DELETE_CACHE = (300, 900)


@dataclass
class Refused:
    """An input the app will not open, with the one line its sender is shown."""

    message: str


@dataclass
class Missing:
    """A dataset tab with no servable model: what to run instead."""

    dataset: str
    message: str


class UploadImage(gr.Image):
    """``gr.Image`` that hands the raw uploaded file to the app, so that a broken, empty or hostile
    file gets a readable message from :func:`decode_image` instead of a stack trace in preprocessing.
    Only files inside Gradio's upload folder are handed on (resolved, so no symlink leads out of it);
    a server path or a URL named in a request is a :class:`Refused`, never opened or downloaded.
    ``is_template`` keeps Gradio's ordinary image widget in the browser."""

    is_template = True

    def preprocess(self, payload: Any) -> str | Refused | None:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # pasted or webcam images may come inline
            if len(payload.url) > DATA_URL_LIMIT:
                return Refused(f"The pasted image is over {DATA_URL_LIMIT // 2**20} MB; upload a smaller one.")
            try:
                return save_base64_to_cache(payload.url, self.GRADIO_CACHE)
            except (ValueError, OSError):
                log.warning("unreadable data: URL (%d characters)", len(payload.url), exc_info=True)
                return Refused("The pasted image could not be read; try uploading it as a file.")
        return uploaded_file(payload.path, self.GRADIO_CACHE)

    def move_resource_to_block_cache(self, url_or_file_path: str | Path | None) -> str | None:
        refuse_url(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)

    async def async_move_resource_to_block_cache(self, url_or_file_path: str | Path | None) -> str | None:
        refuse_url(url_or_file_path)  # Gradio would download it: no size cap, the server as a proxy
        return await super().async_move_resource_to_block_cache(url_or_file_path)


def refuse_url(path: str | Path | None) -> None:
    if isinstance(path, str) and is_http_url_like(path):
        raise ValueError("a URL instead of an upload")


def uploaded_file(path: str | None, cache: str) -> str | Refused:
    """``path`` resolved, if it is a file inside Gradio's upload folder ``cache``; else :class:`Refused`
    with the same message whatever the reason (missing, elsewhere, a link out, a URL)."""
    if not path or is_http_url_like(path):
        return Refused(NOT_AN_UPLOAD)
    try:
        real = Path(path).resolve(strict=True)
        inside = real.is_relative_to(Path(cache).resolve()) and real.is_file()
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        log.warning("refused an image named by a path outside Gradio's upload folder: %r", path)
        return Refused(NOT_AN_UPLOAD)
    return str(real)


class IsolatingBlocks(gr.Blocks):
    """Gradio merges concurrent requests into one call of a batched handler, and an exception while
    one request's input or output is converted (a path Gradio refuses, a malformed payload, an image it
    cannot encode) would fail every request of the batch. Here it fails only that request: its input
    becomes a :class:`Refused` / its outputs the one-line :data:`FAILED`, and the details are logged."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception:
            if not block_fn.batch:
                raise
            log.warning("refused one request's input", exc_info=True)
            return [Refused(NOT_AN_UPLOAD)] + [None] * (len(block_fn.inputs) - 1)

    async def postprocess_data(self, block_fn: Any, predictions: list | dict, state: Any) -> list[Any]:
        try:
            return await super().postprocess_data(block_fn, predictions, state)
        except Exception:
            if not block_fn.batch:
                raise
            log.exception("one request's answer could not be encoded")
            fallback = [f"**Cannot classify this file.** {FAILED}" if isinstance(b, gr.Markdown) else
                        [] if isinstance(b, gr.Gallery) else None for b in block_fn.outputs]
            return await super().postprocess_data(block_fn, fallback, state)


def guard_queue(app: gr.Blocks) -> None:
    """Refuse, at the door, a request whose input count is not its handler's: the queue zips a batch's
    inputs together, so one short request would shift or cut every other request's inputs."""
    push = app._queue.push

    async def checked(body: Any, request: Any, username: Any) -> Any:
        fn = app.fns.get(body.fn_index) if isinstance(body.fn_index, int) else None
        if fn is not None and fn.batch and (not isinstance(body.data, list) or len(body.data) != len(fn.inputs)):
            log.warning("refused a request with %s inputs for %s", len(body.data) if isinstance(body.data, list) else "no",
                        fn.api_name)
            return False, "This request does not match the app's inputs.", "error"
        return await push(body, request, username)

    app._queue.push = checked


# --------------------------------------------------------------------------- loading


def load_models(specs: list[str] | None) -> list[ServedModel | Missing]:
    """``--model`` URIs (optionally ``dataset=URI``) plus each other dataset's champion, if registered.
    A bad ``--model`` raises ValueError (the CLI shows it as one line)."""
    served: list[ServedModel | Missing] = []
    replaced: set[str] = set()
    for spec in specs or []:
        dataset, _, uri = spec.partition("=") if "=" in spec and not spec.startswith("models:") else ("", "", spec)
        if dataset and dataset not in REGISTERED_NAMES:
            raise ValueError(f"--model {spec}: unknown dataset {dataset!r}; use one of {', '.join(REGISTERED_NAMES)}")
        try:
            model = ServedModel(uri)
        except NoModel as e:
            raise ValueError(f"--model {uri}: {e}") from e
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
    """The batched event handler: lists of uploads and toggles in, one list per output component out.
    Each request gets its own answer: a refused or broken upload, or any exception while one upload is
    handled, is that upload's one-line message (details in the server log), never the batch's."""

    def predict(image: list[str | Refused | None], gradcam: list[bool | None]) -> tuple[list, list, list, list]:
        t0 = time.perf_counter()
        labels: list[Any] = [None] * len(image)
        galleries: list[Any] = [[] for _ in image]
        annotated: list[Any] = [None] * len(image)
        status: list[str] = [""] * len(image)
        good, decoded = [], []
        for i, path in enumerate(image):
            if path is None:
                continue  # a cleared input clears the outputs
            if isinstance(path, Refused):
                status[i] = f"**Cannot classify this file.** {path.message}"
                continue
            try:
                decoded.append(decode_image(path, model.channels))
                good.append(i)
            except BadImage as e:
                status[i] = f"**Cannot classify this file.** {e}"
            except Exception:
                log.exception("decoding %s failed", path)
                status[i] = f"**Cannot classify this file.** {FAILED}"
        if not good:
            return labels, galleries, annotated, status
        cams = [bool(gradcam[i]) for i in good]
        try:
            results: list[Result | Exception] = model.classify_each(decoded, cams, finder)
        except Exception:  # the shared forward pass or Grad-CAM: each upload on its own instead
            log.exception("a batch of %d failed; classifying its uploads one by one", len(good))
            results = []
            for d, c in zip(decoded, cams):
                try:
                    results.extend(model.classify_each([d], [c], finder))
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        total_ms = (time.perf_counter() - t0) * 1000
        for i, r in zip(good, results):
            try:
                if isinstance(r, Exception):
                    raise r
                items = []
                for n, s in enumerate(r.subjects, 1):
                    k = int(s.probs.argmax())
                    who = f"face {n}" if s.box is not None else "input"
                    items.append((seen_for_display(s.seen), f"{who}: {model.classes[k]} {pct(s.probs[k])}"))
                    if s.cam is not None:
                        items.append((seen_for_display(s.seen, s.cam), f"{who}: Grad-CAM for {model.classes[k]}"))
                labels[i], galleries[i], annotated[i] = model.top(r.subjects[0].probs), items, r.annotated
                status[i] = describe(model, r, total_ms)
            except Exception:
                log.exception("classifying %s failed", image[i])
                labels[i], galleries[i], annotated[i] = None, [], None
                status[i] = f"**Cannot classify this file.** {FAILED}"
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
                              columns=2, height="auto", object_fit="contain", allow_preview=True,
                              format="jpeg")  # WebP (the default) encoded slower: p50 45.9 vs 39.9 ms per answer, paired
            # JPEG too: Gradio encoded a 1024x768 photo with its boxes as WebP in 57 ms, as JPEG in 5 (AVX2-only CPU)
            annotated = gr.Image(label="Faces found", visible=model.faces, interactive=False, height=260, format="jpeg")
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
    with IsolatingBlocks(title="reslab demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
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
    # Gradio's queue recomputes, after every event, percentiles over all the events it has recorded (up to
    # 10,000) with pandas, for its /monitoring page, which `launch` turns off: 3 ms of a 2-core CPU per request
    # at first and 11 ms at 10,000 events, holding the GIL (docs/demo.md). Never, unless asked for.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    guard_queue(app)
    return app


def wait_until_up(url: str, timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Block until the server answers (raise TimeoutError with the URL if it never does, or at once
    when ``alive`` says the server's process is gone)."""
    deadline = time.monotonic() + timeout
    while alive():
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.5)
    raise TimeoutError(f"the demo's process ended before it answered on {url}")


THEME = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str | int = UPLOAD_LIMIT, block: bool = True,
           auth: tuple[str, str] | None = None) -> gr.Blocks:
    """Serve ``app``. ``show_error`` is off: an unexpected exception reaches the page as Gradio's plain
    "Error", never its text (which can hold object reprs and server paths); the app's own messages
    (``gr.Error``, the status panel) are one line each, and the details go to the server log. Gradio's
    ``/monitoring`` routes, open by default (function names and timings), are off."""
    # _frontend=False skips Gradio's 3-second reachability probe, which fails on a busy machine;
    # wait_until_up checks the same thing with patience.
    app.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size, quiet=True,
               prevent_thread_lock=True, show_error=False, auth=auth, ssr_mode=False, theme=gr.themes.Default(**THEME),
               enable_monitoring=False, _frontend=False)
    wait_until_up(app.local_url)
    if block:
        print(f"reslab demo running on {app.local_url}" + (f" and {app.share_url}" if app.share_url else "")
              + "  (Ctrl+C to stop)", flush=True)
        try:
            app.block_thread()
        except KeyboardInterrupt:
            pass
    return app
