"""REST serving with a real client (issue 15): the published ResNet-20 imported and registered as
``cifar10-resnet@champion``, served by the real ``mlflow models serve --env-manager local`` process,
asked over HTTP with real CIFAR-10 test images as base64 PNGs, with a preprocessed tensor, and with
payloads that are no image. One server start for the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, free_port, missing, module_store, wait_for_server
from tests.test_use_models import R20, cli

NAME = "cifar10-resnet"
URI = f"models:/{NAME}@champion"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir):
    """(base URL, store folder): the published ResNet-20 as version 1 @champion, and its server."""
    if not R20.exists():
        missing(f"published weights not found in {R20.parent}")
    folder = tmp_path_factory.mktemp("rest")
    with module_store(folder, RESLAB_DATA=str(data_dir)):
        from train.published import import_published
        from train.tracking import promote, setup_tracking

        setup_tracking()
        import_published(R20, "resnet20", register=NAME)
        assert promote(NAME, 1, 0.9173) == "champion"
        port = free_port()
        log = open(folder / "serve.log", "w+")
        venv_bin = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH
        proc = subprocess.Popen([f"{venv_bin}/mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"},
                                start_new_session=True)
        try:
            wait_for_server(f"http://127.0.0.1:{port}/ping", proc, 120, lambda: (folder / "serve.log").read_text())
            yield f"http://127.0.0.1:{port}", folder
        finally:
            with contextlib.suppress(ProcessLookupError):  # its own session: mlflow and the uvicorn it started
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()


@pytest.fixture(scope="module")
def pngs(served):
    """Two real CIFAR-10 test images per class, re-encoded losslessly as PNG files."""
    from PIL import Image

    folder = served[1] / "png"
    out = []
    with zipfile.ZipFile(ROOT.parent / "shared" / "datasets" / "cifar10.zip") as z:
        names = z.namelist()
        for cls in CLASSES:
            for n in [n for n in names if n.startswith(f"test/{cls}/")][:2]:
                path = folder / cls / (Path(n).stem + ".png")
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.open(io.BytesIO(z.read(n))).save(path)
                out.append((path, cls))
    return out


def post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_base64_pngs_get_class_names_and_probabilities_like_reslab_predict(served, pngs, capsys):
    url, folder = served
    status, body = post(url, {"dataframe_records": [{"image": b64(p)} for p, _ in pngs]})
    assert status == 200, body
    rows = body["predictions"]
    assert len(rows) == len(pngs)
    for r in rows:
        assert list(r["probabilities"]) == list(CLASSES)  # the model's own class names, in its order
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["class"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["probability"] == pytest.approx(r["probabilities"][r["class"]])
    right = sum(r["class"] == cls for r, (_, cls) in zip(rows, pngs))
    assert right >= 16, [(r["class"], cls) for r, (_, cls) in zip(rows, pngs)]  # a 92% net on 20 images
    # the same files through `reslab predict` (same preprocessing, same weights): same top-1
    cli(["predict", URI, str(folder / "png"), "--top-k", "1", "--out", str(folder / "predict.json"), "--no-progress"])
    by_path = {Path(r["path"]).resolve(): r["top"][0]["class"] for r in json.loads((folder / "predict.json").read_text())}
    assert [r["class"] for r in rows] == [by_path[p.resolve()] for p, _ in pngs]
    # latency of one-image requests, as a client sees it
    times = []
    for p, _ in pngs:
        t0 = time.perf_counter()
        status, _ = post(url, {"dataframe_records": [{"image": b64(p)}]})
        times.append(time.perf_counter() - t0)
        assert status == 200
    with capsys.disabled():
        print(f"\nREST latency, 1 PNG per request: p50 {statistics.median(times) * 1000:.1f} ms over {len(times)} "
              f"(max {max(times) * 1000:.1f} ms)")


def test_a_preprocessed_tensor_gets_the_networks_probabilities(served, cifar):
    from train.usemodel import open_model

    url, _ = served
    opened = open_model(URI)
    x = opened.prep.tensor(cifar.test_x[100:103])
    with torch.no_grad():
        ref = torch.softmax(opened.module(x), 1).numpy()
    status, body = post(url, {"dataframe_split": {"columns": ["tensor"], "data": [[t.tolist()] for t in x.numpy()]}})
    assert status == 200, body
    got = np.array([[r["probabilities"][c] for c in CLASSES] for r in body["predictions"]])
    assert np.abs(got - ref).max() < 1e-4
    assert [r["class"] for r in body["predictions"]] == [CLASSES[k] for k in ref.argmax(1)]


def test_what_is_not_an_image_gets_a_400_that_says_why(served):
    url, _ = served
    status, body = post(url, {"dataframe_records": [{"image": base64.b64encode(b"hello, not a picture").decode()}]})
    assert status == 400 and "row 0: This file is not an image reslab accepts" in body["message"], body
    gray = [[[0.0] * 32] * 32]  # one channel: a grayscale model's input, not this one's
    status, body = post(url, {"dataframe_split": {"columns": ["tensor"], "data": [[gray]]}})
    assert status == 400 and "has shape (1, 32, 32); this model takes (3, 32, 32)" in body["message"], body
    status, body = post(url, {"dataframe_records": [{"picture": "abc"}]})
    assert status == 400 and "expected rows with a column 'image'" in body["message"], body


def test_images_are_decoded_as_the_demo_and_reslab_predict_decode_them(served, pngs):
    """The REST model decodes with the demo's decoder (train/images.py): a 16-bit PNG is scaled to 8 bits
    (it was clipped to white) and answers as its 8-bit copy does; EPS, which Pillow hands to Ghostscript,
    is refused."""
    from PIL import Image

    url, _ = served
    rgb = np.asarray(Image.open(pngs[0][0]).convert("L"), dtype=np.uint16)
    sixteen, eight = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb * 257).save(sixteen, format="PNG")  # 16-bit: v * 257 >> 8 == v
    Image.fromarray(rgb.astype(np.uint8)).save(eight, format="PNG")
    status, body = post(url, {"dataframe_records": [{"image": base64.b64encode(b.getvalue()).decode()} for b in (sixteen, eight)]})
    assert status == 200, body
    a, b = body["predictions"]
    assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6), (a, b)
    eps = io.BytesIO()
    Image.open(pngs[0][0]).convert("RGB").save(eps, format="EPS")
    status, body = post(url, {"dataframe_records": [{"image": base64.b64encode(eps.getvalue()).decode()}]})
    assert status == 400 and "not an image reslab accepts" in body["message"], body
