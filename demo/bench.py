"""``reslab demo --bench``: the demo's end-to-end latency, measured the way a browser or API client sees it.

The forward pass is a few milliseconds; what a user waits for is the whole HTTP exchange through
Gradio: the upload, the queue, Gradio's pre- and postprocessing, the handler (decoding, faces, the
forward pass, Grad-CAM) and the answer's encoding. So this starts the real ``reslab demo`` as a process
of its own on 127.0.0.1 and a free port, and times, from this (client) process, what the browser does
per image: ``POST /gradio_api/upload``, ``POST /gradio_api/queue/join``, then the event stream
``GET /gradio_api/queue/data`` until ``process_completed``. Images are real test-split images of the
model's dataset (reslab's data code, PNG at their own size). First some warm-up requests, then N one
at a time, then a burst of concurrent requests released together.

Where the time goes: the server runs with Gradio's own profiler (``GRADIO_PROFILING=1``), whose
per-batch traces (queue wait, preprocess, handler call, postprocess, upload) are read back over HTTP;
the handler's own status line gives the forward pass. Everything raw goes into the JSON.

It lives in ``demo`` (``train`` never imports ``demo``), hence ``reslab demo --bench``, with
``reslab bench``'s flag names where they mean the same thing (``--model-uri``, ``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

API = "/gradio_api"
TARGET_P50_MS = 50.0  # issue 17: one image, end to end, on a quiet machine
TARGET_BURST_P95_MS = 2000.0  # issue 17: 50 concurrent requests


@dataclass
class Call:
    """One request as the client saw it; times in ms from the request's own start."""

    image: int  # index into the test split
    ok: bool = False
    error: str = ""
    upload_ms: float = 0.0  # upload answered
    joined_ms: float = 0.0  # queue/join answered
    started_ms: float = 0.0  # process_starts received (0 if Gradio sent none)
    total_ms: float = 0.0  # process_completed received: the answer is in
    event_id: str = ""
    label: str = ""
    confidence: float = 0.0
    forward_ms: float | None = None  # the forward pass (of the whole batch), from the status line
    handler_ms: float | None = None  # the handler's whole call, from the status line
    batch: int | None = None  # images in that forward pass


@dataclass
class Images:
    """Test-split images written as PNG files, cycled through by the requests."""

    dataset: str
    indices: list[int]
    labels: list[int]
    paths: list[Path]
    classes: list[str] = field(default_factory=list)

    def pick(self, k: int) -> tuple[int, Path]:
        j = k % len(self.paths)
        return self.indices[j], self.paths[j]


def test_images(dataset: str, count: int, folder: Path) -> Images:
    """``count`` test images of ``dataset``, classes in turn (the split is sorted by class), as PNG."""
    from PIL import Image

    from train.data import load_dataset

    data = load_dataset(dataset, progress=False)
    per_class = [np.flatnonzero(data.test_y == c) for c in range(data.num_classes)]
    count = min(count, data.num_classes * min(len(c) for c in per_class))  # FER-2013 has 111 'disgust' test images:
    picks = [int(per_class[k % data.num_classes][k // data.num_classes]) for k in range(count)]  # requests cycle them
    paths = []
    for i in picks:
        img = data.test_x[i]
        path = folder / f"{dataset}-test-{i}.png"
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(path)
        paths.append(path)
    return Images(dataset, picks, [int(data.test_y[i]) for i in picks], paths, list(data.classes))


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def demo_server(model_uri: str, batch_size: int, queue_size: int, threads: int, log: Path,
                timeout: float = 300) -> Iterator[str]:
    """``reslab demo`` serving ``model_uri`` as a process of its own, with Gradio's profiler on; yields its URL."""
    from .app import wait_until_up

    port = free_port()
    cmd = [sys.executable, "-m", "train.cli", "demo", "--host", "127.0.0.1", "--port", str(port), "--no-examples",
           "--model", model_uri, "--batch-size", str(batch_size), "--queue-size", str(queue_size),
           "--threads", str(threads)]
    env = {**os.environ, "GRADIO_PROFILING": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(url + "/", timeout, alive=lambda: proc.poll() is None)
        except TimeoutError as e:
            tail = log.read_text()[-2000:]
            state = f"exited with {proc.returncode}" if proc.poll() is not None else str(e)
            raise RuntimeError(f"reslab demo did not come up ({state}); its output ends:\n{tail}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def endpoint(http: Any, url: str, dataset: str) -> tuple[int, str]:
    """The classify event of ``dataset``'s tab: (fn_index, api_name), from the app's config."""
    config = http.get(url + "/config").json()
    names = {d["api_name"]: d["id"] for d in config["dependencies"] if str(d.get("api_name", "")).startswith("classify_")}
    name = f"classify_{dataset}"
    if name not in names:
        raise RuntimeError(f"the demo has no {name} endpoint (it has {', '.join(sorted(names)) or 'none'})")
    return names[name], name


# --------------------------------------------------------------------------- one request


STATUS = re.compile(r"Inference ([\d.]+) ms \(one forward pass over (\d+) images?\), (\d+) ms in all")


def request(http: Any, url: str, fn_index: int, image: int, path: Path, gradcam: bool) -> Call:
    """Upload, join the queue and read the event stream to the answer, as the page's client does."""
    call = Call(image)
    t0 = time.perf_counter()

    def ms() -> float:
        return (time.perf_counter() - t0) * 1000

    try:
        with path.open("rb") as f:
            r = http.post(url + API + "/upload", files={"files": (path.name, f, "image/png")})
        r.raise_for_status()
        call.upload_ms = ms()
        file = {"path": r.json()[0], "orig_name": path.name, "size": path.stat().st_size, "mime_type": "image/png",
                "meta": {"_type": "gradio.FileData"}}
        session = uuid.uuid4().hex
        r = http.post(url + API + "/queue/join", json={"data": [file, gradcam], "fn_index": fn_index,
                                                       "session_hash": session, "event_data": None, "trigger_id": None})
        if r.status_code != 200:
            raise RuntimeError(f"queue/join answered {r.status_code}: {r.text[:200]}")
        call.event_id = r.json()["event_id"]
        call.joined_ms = ms()
        with http.stream("GET", url + API + "/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_starts":
                    call.started_ms = ms()
                elif msg.get("msg") == "process_completed":
                    call.total_ms = ms()
                    read_answer(call, msg)
                    break
            else:
                raise RuntimeError("the event stream ended without an answer")
    except Exception as e:  # noqa: BLE001  (a failed request is a result: counted and reported)
        call.ok, call.error, call.total_ms = False, f"{type(e).__name__}: {str(e)[:200]}", ms()
    return call


def read_answer(call: Call, msg: dict[str, Any]) -> None:
    """The label and the handler's own timings from a ``process_completed`` message."""
    if not msg.get("success"):
        call.error = f"the server answered with an error: {str(msg.get('output'))[:200]}"
        return
    label, _, _, status = msg["output"]["data"]
    if not label or "label" not in label:
        call.error = f"no prediction: {str(status)[:200]}"
        return
    call.ok, call.label = True, str(label["label"])
    call.confidence = float(next((c["confidence"] for c in label.get("confidences", []) if c["label"] == call.label), 0.0))
    m = STATUS.search(status or "")
    if m:
        call.forward_ms, call.batch, call.handler_ms = float(m.group(1)), int(m.group(2)), float(m.group(3))


# --------------------------------------------------------------------------- the measurement


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "max": float(a.max()),
            "mean": float(a.mean())}


def sequential(http: Any, url: str, fn: int, images: Images, n: int, start: int, gradcam: bool) -> list[Call]:
    return [request(http, url, fn, *images.pick(start + k), gradcam) for k in range(n)]


def burst(http: Any, url: str, fn: int, images: Images, n: int, start: int, gradcam: bool) -> tuple[list[Call], float]:
    """``n`` requests released at once (a barrier), each on its own thread; returns them and the wall time
    from the release to the last answer."""
    gate = threading.Barrier(n + 1)

    def one(k: int) -> Call:
        gate.wait()
        return request(http, url, fn, *images.pick(start + k), gradcam)

    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, k) for k in range(n)]
        gate.wait()
        t0 = time.perf_counter()
        calls = [f.result() for f in futures]
        wall = (time.perf_counter() - t0) * 1000
    return calls, wall


def summary(calls: list[Call]) -> dict[str, Any]:
    ok = [c for c in calls if c.ok]
    phases = {
        "total_ms": [c.total_ms for c in ok],
        "upload_ms": [c.upload_ms for c in ok],
        "join_ms": [c.joined_ms - c.upload_ms for c in ok],
        "until_started_ms": [c.started_ms - c.joined_ms for c in ok if c.started_ms],
        "started_to_answer_ms": [c.total_ms - c.started_ms for c in ok if c.started_ms],
        "handler_ms": [c.handler_ms for c in ok if c.handler_ms is not None],
        "forward_ms": [c.forward_ms for c in ok if c.forward_ms is not None],
    }
    return {"requests": len(calls), "answered": len(ok), "failed": [c.error for c in calls if not c.ok],
            **{k: percentiles(v) for k, v in phases.items()},
            "largest_batch": max((c.batch or 0 for c in ok), default=0)}


def server_traces(http: Any, url: str, event_ids: set[str]) -> dict[str, Any]:
    """Gradio's profiler traces for these requests' batches (keyed by the batch's first event), summarised
    per phase; ``{}`` if the server has no profiler."""
    try:
        r = http.get(url + API + "/profiling/traces")
        r.raise_for_status()
        traces = r.json()
    except Exception:  # noqa: BLE001
        return {}
    mine = [t for t in traces if t.get("event_id") in event_ids]
    keys = [k for k in (mine[0] if mine else {}) if k.endswith("_ms") and any(t[k] for t in mine)]
    return {"batches": len(mine), **{k: percentiles([t[k] for t in mine]) for k in keys}, "raw": mine}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the demo, measure it, stop it; the whole result as one dict."""
    import httpx
    import torch

    from train.bench import machine_info
    from train.machine import cpu_has_flag
    from train.tracking import setup_tracking
    from train.usemodel import default_model_uri, open_model

    setup_tracking()  # reslab's store (or MLFLOW_TRACKING_URI), as the demo it starts uses; not MLflow's ./mlflow.db
    uri = args.model_uri or default_model_uri(args.dataset)
    opened = open_model(uri)  # a bad URI is one line here, before any server starts
    dataset = opened.prep.dataset
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reslab-demo-bench-") as tmp:
        images = test_images(dataset, max(args.requests, args.concurrent, 1), Path(tmp))
        log = Path(tmp) / "demo.log"
        limits = httpx.Limits(max_connections=args.concurrent + 10, max_keepalive_connections=args.concurrent + 10)
        with demo_server(uri, args.batch_size, args.queue_size, args.threads, log) as url, \
                httpx.Client(timeout=args.timeout, limits=limits) as http:
            fn, api_name = endpoint(http, url, dataset)
            warm = sequential(http, url, fn, images, args.warmup, 0, args.gradcam)
            seq = sequential(http, url, fn, images, args.requests, 0, args.gradcam)
            conc, wall = burst(http, url, fn, images, args.concurrent, 0, args.gradcam) if args.concurrent else ([], 0.0)
            traces_seq = server_traces(http, url, {c.event_id for c in seq})
            traces_conc = server_traces(http, url, {c.event_id for c in conc})
            server_log = log.read_text()[-4000:]
    info = {**machine_info(torch.device("cpu")), "avx512_bf16": cpu_has_flag("avx512_bf16")}
    return {
        "what": "reslab demo end to end: upload + queue/join + event stream to process_completed, over HTTP on 127.0.0.1",
        "model_uri": uri, "registered": f"{opened.name} v{opened.version}" if opened.name else "",
        "architecture": opened.config.get("architecture"), "model_args": opened.config.get("model_args") or {},
        "dataset": dataset, "api_name": api_name, "gradcam": args.gradcam, "batch_size": args.batch_size,
        "queue_size": args.queue_size, "server_threads": args.threads, "warmup": len(warm),
        "images": [{"index": i, "label": images.classes[y]} for i, y in zip(images.indices, images.labels)],
        "sequential": {**summary(seq), "server": traces_seq, "calls": [asdict(c) for c in seq]},
        "concurrent": {**summary(conc), "wall_ms": wall, "server": traces_conc, "calls": [asdict(c) for c in conc]},
        "targets": {"sequential_p50_ms": TARGET_P50_MS, "concurrent_p95_ms": TARGET_BURST_P95_MS},
        "machine": info, "niceness": os.nice(0), "server_log_tail": server_log,
        "seconds": time.perf_counter() - t_start, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report: latency per phase, sequential and concurrent, against the targets."""
    m = res["machine"]
    lines = [f"reslab demo --bench: {res['model_uri']} ({res['architecture']} {json.dumps(res['model_args'])}, "
             f"{res['dataset']}), Grad-CAM {'on' if res['gradcam'] else 'off'}, batch up to {res['batch_size']}; "
             f"{m['cpu']}, {m['cores']} cores, avx512_bf16 {'yes' if m.get('avx512_bf16') else 'no'}, "
             f"server torch threads {res['server_threads']}, nice {res['niceness']}", "",
             f"{'ms':<34} {'p50':>8} {'p95':>8} {'max':>8}"]

    def row(name: str, p: dict[str, float]) -> None:
        if p:
            lines.append(f"{name:<34} {p['p50']:>8.1f} {p['p95']:>8.1f} {p['max']:>8.1f}")

    for part, title in (("sequential", "one at a time"), ("concurrent", "all at once")):
        s = res[part]
        if not s["requests"]:
            continue
        lines.append(f"{title}: {s['answered']}/{s['requests']} answered"
                     + (f", all in {s['wall_ms']:.0f} ms, largest batch {s['largest_batch']}" if part == "concurrent" else ""))
        row("  end to end (HTTP)", s["total_ms"])
        row("    upload", s["upload_ms"])
        row("    queue/join", s["join_ms"])
        row("    join to process_starts", s["until_started_ms"])
        row("    process_starts to answer", s["started_to_answer_ms"])
        for k in ("queue_wait_ms", "preprocess_ms", "fn_call_ms", "postprocess_ms"):
            if k in s["server"]:
                row(f"    server: {k.removesuffix('_ms')} (per batch)", s["server"][k])
        row("    handler (status line)", s["handler_ms"])
        row("    forward pass (status line)", s["forward_ms"])
    seq, conc = res["sequential"]["total_ms"], res["concurrent"]["total_ms"]
    lines.append("")
    if seq:
        lines.append(f"target: one image p50 <= {TARGET_P50_MS:.0f} ms: {seq['p50']:.1f} ms "
                     f"({verdict(res['sequential'], seq['p50'], TARGET_P50_MS)})")
    if conc:
        lines.append(f"target: {res['concurrent']['requests']} concurrent p95 <= {TARGET_BURST_P95_MS:.0f} ms: "
                     f"{conc['p95']:.0f} ms ({verdict(res['concurrent'], conc['p95'], TARGET_BURST_P95_MS)})")
    lines.append(f"load average (1 min) at the end: {m['load_average_1min']:.2f}; total {res['seconds']:.0f} s")
    return "\n".join(lines)


def verdict(phase: dict[str, Any], value: float, target: float) -> str:
    """Whether a phase met its latency target. Its percentiles are of the answered requests only, so a request that
    failed (timed out, queue full) fails the target: 40 fast answers and 10 timeouts read "met" before."""
    failed = len(phase["failed"])
    return f"NOT met: {failed} failed" if failed else "met" if value <= target else "NOT met"


def cmd_bench(args: argparse.Namespace) -> None:
    from train.bench import show_and_save
    from train.cli import fail
    from train.files import output_path

    if args.requests < 1 or args.concurrent < 0 or args.warmup < 0:
        fail("--requests must be at least 1, --concurrent and --warmup at least 0")
    if args.concurrent > args.queue_size:
        fail(f"--concurrent {args.concurrent} is more than the queue holds (--queue-size {args.queue_size})")
    if args.out:
        output_path(args.out)  # a folder or an unwritable place, before the server starts, not after the benchmark
    res = run(args)
    show_and_save(format_table(res), res, args.out)
