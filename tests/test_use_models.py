"""Using models outside training and the browser (docs/using-models.md): the published CIFAR ResNet
checkpoints imported and evaluated, ``reslab predict`` on real files, ``reslab export`` checked with
onnxruntime, and transfer from a published checkpoint to FER-2013. Real data and real weights from
../shared; one MLflow store for the module (the import is logged once)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, missing, module_store

PRETRAINED = Path(ROOT.parent / "shared" / "pretrained")
R20 = PRETRAINED / "resnet20-12fca82f.th"
R32 = PRETRAINED / "resnet32-d509ac18.th"
R56 = PRETRAINED / "resnet56-4bfd9763.th"
COMMANDS = ("import", "evaluate", "export", "predict")


def cli(argv: list[str]) -> None:
    """``reslab <argv>`` in-process, through the registered entry points of these commands only (so a
    half-edited other command cannot break these tests), with the real error handling of ``main``."""
    from train.cli import fail
    from train.errors import user_errors

    parser = argparse.ArgumentParser(prog="reslab")
    sub = parser.add_subparsers(dest="command")
    for ep in entry_points(group="reslab.commands"):
        if ep.name in COMMANDS:
            ep.load()(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except user_errors() as e:
        fail(str(e).splitlines()[0])


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_dir):
    if not R20.exists():
        missing(f"published weights not found in {PRETRAINED}")
    folder = tmp_path_factory.mktemp("use-models")
    with module_store(folder, RESLAB_DATA=str(data_dir)):
        from train.tracking import setup_tracking

        setup_tracking()
        yield folder


@pytest.fixture(scope="module")
def imported(store):
    """The published ResNet-20, imported and registered once for the module."""
    cli(["import", str(R20), "--model", "resnet20", "--register", "cifar10-resnet20-published"])
    return "models:/cifar10-resnet20-published/1"


@pytest.fixture(scope="module")
def cifar_files(store):
    """Real CIFAR-10 test images as files: two per class, with their true class."""
    folder = store / "images"
    picked = []
    with zipfile.ZipFile(ROOT.parent / "shared" / "datasets" / "cifar10.zip") as z:
        for cls in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            members = [n for n in z.namelist() if n.startswith(f"test/{cls}/")][:2]
            for n in members:
                out = folder / cls / Path(n).name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(n))
                picked.append((out, cls))
    return folder, picked


def test_help_of_each_command(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"reslab {name}" in out and "example: reslab " + name in out


def test_published_resnet20_imports_and_evaluates_near_its_stated_accuracy(imported, capsys):
    """Publisher: 8.27% test error (91.73%), and so it measures on the whole real test split. A stratified
    1000-image subset (--limit) stays within about 3 points, and its --log leaves the registry version's test
    accuracy alone: a subset's figure would feed the champion rule."""
    capsys.readouterr()
    cli(["evaluate", imported, "--limit", "1000", "--log", "--no-progress", "--out", "subset.json"])
    subset = json.loads(Path("subset.json").read_text())
    assert subset["images"] == 1000 and subset["subset"] and 0.885 <= subset["accuracy"] <= 0.95, subset["accuracy"]
    assert [int(v["support"]) for v in subset["per_class"].values()] == [100] * 10  # stratified, not the first class
    assert "test_acc" not in mlflow.MlflowClient().get_model_version("cifar10-resnet20-published", "1").tags
    # as `reslab train --register` tags a version it did not test: "nan", which the whole split's evaluation replaces
    mlflow.MlflowClient().set_model_version_tag("cifar10-resnet20-published", "1", "test_acc", "nan")
    capsys.readouterr()
    cli(["evaluate", imported, "--log", "--no-progress", "--out", "report.json"])
    out = capsys.readouterr().out
    from train.usemodel import open_model

    assert f"(metrics linked to model_id {open_model(imported).model_id})" in out  # the whole split: linked
    report = json.loads(Path("report.json").read_text())
    assert report["images"] == 10000 and report["dataset"] == "cifar10" and not report["subset"]
    assert report["accuracy"] == pytest.approx(0.9173, abs=0.0005), report["accuracy"]
    assert report["f1_macro"] > 0.9 and np.asarray(report["confusion_matrix"]).sum() == 10000
    assert f"accuracy {report['accuracy']:.4f}" in out and "confusion matrix" in out
    # --log: the metrics are linked to the logged model and the registry version got its accuracy
    mv = mlflow.MlflowClient().get_model_version("cifar10-resnet20-published", "1")
    assert float(mv.tags["test_acc"]) == pytest.approx(report["accuracy"])
    model_id = open_model(imported).model_id
    assert model_id and mv.source.endswith(model_id)  # the version is that logged model
    lm = mlflow.get_logged_model(model_id)
    assert {m.key: m.value for m in lm.metrics}["test_acc"] == pytest.approx(report["accuracy"])
    run = mlflow.get_run(next(m.run_id for m in lm.metrics if m.key == "test_acc"))
    test_inputs = [d for d in run.inputs.dataset_inputs if any(t.value == "test" for t in d.tags)]
    assert test_inputs and test_inputs[0].dataset.name == "cifar10"


def test_evaluate_reads_a_folder_of_the_users_own_labelled_images(imported, cifar_files, store, capsys):
    """`reslab evaluate --data FOLDER` with <class>/<image> (or test/<class>/<image>) and no train/: the help
    and docs promised any labelled folder, but only a whole dataset (train/ and test/) was read. The report is
    the model's own predictions on those files; a folder of some classes is fine; --log leaves the registry
    version's test accuracy alone (these images are not the test split)."""
    from PIL import Image

    from train.evaluate import predict_arrays
    from train.usemodel import open_model

    folder, picked = cifar_files
    classes = list(open_model(imported).prep.classes)
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in picked])
    want = (predict_arrays(open_model(imported), x, progress=False).argmax(1) == [classes.index(c) for _, c in picked]).mean()
    tags = dict(mlflow.MlflowClient().get_model_version("cifar10-resnet20-published", "1").tags)
    capsys.readouterr()
    cli(["evaluate", imported, "--data", str(folder), "--log", "--no-progress", "--out", "mine.json"])
    report = json.loads(Path("mine.json").read_text())
    assert report["images"] == 20 and report["accuracy"] == pytest.approx(want), (report["accuracy"], want)
    assert [int(v["support"]) for v in report["per_class"].values()] == [2] * 10
    out = capsys.readouterr().out
    assert f"on the labelled images in {folder} (20 images" in out
    assert dict(mlflow.MlflowClient().get_model_version("cifar10-resnet20-published", "1").tags) == tags
    # nor are its metrics linked to the logged model, whose page shows test-split metrics
    run_id = out.split("logged to MLflow run ")[1].split()[0]
    assert "model_id" not in out.split("logged to MLflow run ")[1].splitlines()[0]  # nor does the line say they are
    assert mlflow.get_run(run_id).data.metrics["test_acc"] == pytest.approx(want)
    model = mlflow.get_logged_model(open_model(imported).model_id)
    assert all(m.run_id != run_id for m in model.metrics or []), model.metrics

    some = store / "some" / "test"
    for cls in ("cat", "dog"):
        shutil.copytree(folder / cls, some / cls)
    (some / "cat" / "broken.png").write_bytes(b"not a png")
    (some / "cat" / ".ipynb_checkpoints").mkdir()  # a notebook's copies: not images of the folder
    shutil.copy(next((some / "cat").glob("*.png")), some / "cat" / ".ipynb_checkpoints" / "copy-checkpoint.png")
    with pytest.warns(match="skipped 1 unreadable image"):
        cli(["evaluate", imported, "--data", str(some.parent), "--no-progress", "--out", "some.json"])
    report = json.loads(Path("some.json").read_text())
    supports = {c: int(v["support"]) for c, v in report["per_class"].items()}
    assert report["images"] == 4 and supports["cat"] == supports["dog"] == 2 and sum(supports.values()) == 4
    # macro F1 over the classes these images have or were given, not all ten (the eight absent ones scored 0)
    from sklearn.metrics import f1_score

    cm = np.asarray(report["confusion_matrix"])
    truth, said = np.nonzero(cm)
    truth, said = np.repeat(truth, cm[truth, said]), np.repeat(said, cm[truth, said])
    assert report["f1_macro"] == pytest.approx(f1_score(truth, said, average="macro")), report["f1_macro"]

    (some / "kitten").mkdir()  # not one of the model's classes: said, not read as a dataset source
    with pytest.raises(SystemExit):
        cli(["evaluate", imported, "--data", str(some.parent), "--no-progress"])
    assert "sub-folder(s) kitten are not classes of this model (airplane, automobile" in capsys.readouterr().err


def test_bench_serves_a_given_model_with_its_own_preprocessing(imported, cifar):
    """`reslab bench --model-uri` fed a given model the benchmark dataset's normalisation (the published
    ResNet-20 was trained with ImageNet's) and compared its answers with the benchmark's own fresh network.
    Its served accuracy is now what `reslab evaluate` computes on the same images, and there is no agreement."""
    from train.bench import serving_metrics
    from train.config import TrainConfig
    from train.engine import Runtime
    from train.evaluate import predict_arrays
    from train.usemodel import open_model

    cfg = TrainConfig(dataset="cifar10", model="resnet20", precision="fp32")
    opened = open_model(imported)
    s = serving_metrics(opened.module, cifar, cfg, Runtime.create(cfg, cifar), imported, 1000, 2)
    pick = np.sort(np.random.default_rng(0).permutation(len(cifar.test_y))[:1000])  # the bench's sample
    want = (predict_arrays(opened, cifar.test_x[pick], progress=False).argmax(1) == cifar.test_y[pick]).mean()
    assert s["model_store"] == "given" and s["served_eval_accuracy"] == pytest.approx(want, abs=1e-9), (s, want)
    assert "served_top1_agreement" not in s


def test_an_ensemble_is_the_mean_of_its_models_probabilities(imported, capsys):
    """The published ResNet-20 and ResNet-32 as one ensemble at TTA level 1 on 300 real test images: its
    confusion matrix is that of the argmax of the two models' mean probabilities, each the softmax of the
    mean of the model's logits on the image and its mirror, computed here by hand."""
    from sklearn.metrics import confusion_matrix

    from train.data import load_dataset, stratified_subset
    from train.evaluate import model_inputs
    from train.usemodel import open_model

    cli(["import", str(R32), "--model", "resnet32", "--register", "cifar10-resnet32-published"])
    r32 = "models:/cifar10-resnet32-published/1"
    capsys.readouterr()
    cli(["evaluate", imported, r32, "--tta", "--limit", "300", "--no-progress", "--out", "ensemble.json"])
    out = capsys.readouterr().out
    report = json.loads(Path("ensemble.json").read_text())
    assert report["models"] == [imported, r32] and report["tta"] == 1 and report["images"] == 300
    assert out.startswith(f"ensemble of 2 (mean softmax): {imported} + {r32}") and "TTA level 1: 2 views" in out

    data = load_dataset("cifar10")
    keep = np.sort(stratified_subset(data.test_y, 300))
    x, y = data.test_x[keep], data.test_y[keep]
    probs, plain = [], []
    for uri in (imported, r32):
        m = open_model(uri)
        m.module.eval()
        with torch.no_grad():
            t = m.prep.tensor(model_inputs(m, x))
            logits = m.module(t)
            probs.append(torch.softmax((logits + m.module(t.flip(3))) / 2, 1).numpy())
            plain.append(logits.argmax(1).numpy())
    ensemble = np.mean(probs, 0).argmax(1)
    # what makes this a test of the ensemble and the TTA: neither member alone, nor no TTA, predicts the same
    assert (ensemble != probs[0].argmax(1)).any() and (ensemble != probs[1].argmax(1)).any()
    assert (probs[0].argmax(1) != plain[0]).any()
    assert np.array_equal(report["confusion_matrix"], confusion_matrix(y, ensemble, labels=range(10)))
    assert report["accuracy"] == pytest.approx((ensemble == y).mean())


def test_evaluate_refuses_to_log_an_ensemble(imported, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["evaluate", imported, imported, "--log"])
    assert e.value.code == 2
    assert "--log records an evaluation against one model" in capsys.readouterr().err


def test_import_refuses_a_checkpoint_of_another_depth(store, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["import", str(R56), "--model", "resnet20"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "published CIFAR ResNet-56, not resnet20" in err and "does not fit" in err


def test_transfer_from_published_resnet56_to_fer2013(fer):
    """Grayscale stem = the colour filters summed (same response to a gray image), classifier fresh,
    every other tensor the published one; and the network trains a few steps from there."""
    from train.config import TrainConfig
    from train.engine import build_model
    from train.pretrained import map_published, read_state_dict

    cfg = TrainConfig(dataset="fer2013", model="resnet56", pretrained=str(R56)).resolved()
    model = build_model(cfg, fer)
    published = map_published(read_state_dict(R56))
    own = model.state_dict()
    assert torch.equal(own["stem.0.weight"], published["stem.0.weight"].sum(1, keepdim=True))
    assert own["fc.weight"].shape == (7, 64) and not torch.equal(own["fc.weight"][:7], published["fc.weight"][:7])
    assert torch.equal(own["layers.2.8.conv2.weight"], published["layers.2.8.conv2.weight"])
    gray = torch.rand(1, 1, 48, 48)
    ref = torch.nn.functional.conv2d(gray.expand(1, 3, 48, 48), published["stem.0.weight"], padding=1)
    assert torch.allclose(model.stem[0](gray), ref, atol=1e-5)
    # it trains from there: a few SGD steps on 8 real FER-2013 faces lower their loss
    from train.augment import normalize

    x = normalize(torch.from_numpy(fer.train_x[:8]), torch.tensor(fer.mean), torch.tensor(fer.std), channels_last=False)
    y = torch.from_numpy(fer.train_y[:8])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_torchvision_weights_are_chosen_by_architecture(tmp_path, monkeypatch):
    """resnet50 (16 bottleneck blocks) is not resnet34 (16 basic blocks); without the cache, one clear error."""
    from train.models import create_model
    from train.pretrained import torchvision_depth, torchvision_state

    assert [torchvision_depth(create_model(f"resnet{d}")) for d in (18, 34, 50, 101, 152)] == [18, 34, 50, 101, 152]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ResNet-50 weights \(ResNet50_Weights.IMAGENET1K_V2\) are not in the local cache"):
        torchvision_state(create_model("resnet50"))
    with pytest.raises(ValueError, match="needs an ImageNet-style resnet"):
        torchvision_state(create_model("resnet20"))


def test_predict_files_folders_globs_zip_and_bad_files(imported, cifar_files, store, capsys):
    folder, picked = cifar_files
    (store / "bad").mkdir(exist_ok=True)
    (store / "bad" / "empty.png").write_bytes(b"")
    (store / "bad" / "notes.jpg").write_text("not an image")
    with zipfile.ZipFile(store / "few.zip", "w") as z:
        for path, cls in picked[:3]:
            z.write(path, f"inner/{cls}/{path.name}")
    capsys.readouterr()
    cli(["predict", imported, str(folder / "cat"), str(folder / "ship" / "*.webp"), str(store / "few.zip"),
         str(picked[0][0]), str(store / "bad"), str(store / "missing.png"), "--top-k", "2", "--batch-size", "4",
         "--out", "results.json", "--no-progress"])
    out = capsys.readouterr().out
    rows = json.loads(Path("results.json").read_text())
    good = [r for r in rows if "error" not in r]
    bad = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert len(good) == 2 + 2 + 3 + 1
    assert set(bad) == {"empty.png", "notes.jpg", "missing.png"}
    assert "empty" in bad["empty.png"] and "not an image" in bad["notes.jpg"] and "no such file" in bad["missing.png"]
    assert "8 image(s) classified, 3 bad file(s)" in out
    assert all(len(r["top"]) == 2 and r["top"][0]["probability"] >= r["top"][1]["probability"] for r in good)
    truth = {r["path"]: r["path"].split("/")[-2] for r in good}  # folder (or zip folder) name = true class
    right = sum(r["top"][0]["class"] == truth[r["path"]] for r in good)
    assert right >= 6, rows  # the published net is 92% accurate
    # CSV: the same rows, top-k as columns
    cli(["predict", imported, str(folder / "cat"), str(store / "bad"), "--top-k", "3", "--out", "results.csv", "--no-progress"])
    table = list(csv.DictReader(open("results.csv")))
    assert [bool(r["error"]) for r in table] == [False, False, True, True]
    assert table[0]["class1"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert 0 < float(table[0]["prob1"]) <= 1 and table[0]["prob3"]


def test_predict_faces_gives_one_row_per_face_with_its_box(imported, store, fer):
    """--faces: each detected face is classified on its own and reported with its box (largest first).
    Two real FER-2013 test faces (the first happy and angry ones) at 144 and 192 px, side by side on grey."""
    import cv2
    from PIL import Image

    picks = [int(np.flatnonzero(fer.test_y == fer.classes.index(c))[0]) for c in ("happy", "angry")]
    tiles = [cv2.resize(fer.test_x[j][..., 0], (48 * k, 48 * k)) for j, k in zip(picks, (3, 4))]
    canvas = np.full((240, 48 * 7 + 96), 128, np.uint8)
    canvas[48:192, 24:168], canvas[24:216, 216:408] = tiles
    Image.fromarray(canvas).save(store / "two-faces.png")
    cli(["predict", imported, str(store / "two-faces.png"), "--faces", "--out", "faces.json", "--no-progress"])
    rows = json.loads(Path("faces.json").read_text())
    assert [r["face"] for r in rows] == [1, 2], rows
    big, small = rows[0]["box"], rows[1]["box"]
    assert big[2] > small[2] and 216 < big[0] + big[2] / 2 < 408 and 24 < small[0] + small[2] / 2 < 168, rows  # each box on its face
    assert all(len(r["top"]) == 3 for r in rows)
    # the same photo 6x larger (2592 px wide) is shrunk for detection; its boxes are in the file's pixels
    Image.fromarray(cv2.resize(canvas, None, fx=6, fy=6)).save(store / "two-faces-6x.png")
    cli(["predict", imported, str(store / "two-faces-6x.png"), "--faces", "--out", "faces6.json", "--no-progress"])
    large = json.loads(Path("faces6.json").read_text())
    assert [r["face"] for r in large] == [1, 2], large
    for r6, r1 in zip(large, rows):
        centre6, centre1 = r6["box"][0] + r6["box"][2] / 2, r1["box"][0] + r1["box"][2] / 2
        assert abs(centre6 - 6 * centre1) < 0.1 * 6 * 432 and 0.75 < r6["box"][2] / (6 * r1["box"][2]) < 1.33, (r6, r1)
    # the same 6x photo as a phone stores a portrait: pixels turned, EXIF orientation 6 (turn to show). The
    # boxes are in the picture as shown, where they were above (the axes' scales were mixed before)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(cv2.resize(canvas, None, fx=6, fy=6))).save(store / "turned.jpg", exif=exif, quality=95)
    cli(["predict", imported, str(store / "turned.jpg"), "--faces", "--out", "turned.json", "--no-progress"])
    turned = json.loads(Path("turned.json").read_text())
    assert [r["face"] for r in turned] == [1, 2], turned
    for rt, r6 in zip(turned, large):
        assert all(abs(a - b) < 0.1 * r6["box"][2] for a, b in zip(rt["box"], r6["box"])), (rt, r6)
    # a PGM file, as training reads them, is classified too
    Image.fromarray(canvas).save(store / "two-faces.pgm")
    cli(["predict", imported, str(store / "two-faces.pgm"), "--faces", "--out", "pgm.json", "--no-progress"])
    assert [r["box"] for r in json.loads(Path("pgm.json").read_text())] == [r["box"] for r in rows]


def test_export_onnx_agrees_with_pytorch_on_real_images(imported, cifar, capsys):
    import onnxruntime as ort

    from train.usemodel import open_model

    capsys.readouterr()
    cli(["export", imported, "--format", "onnx", "--out", "r20.onnx", "--verify", "64", "--no-progress"])
    out = capsys.readouterr().out
    assert "max abs logit diff" in out and "top-1 identical on 64/64" in out
    side = json.loads(Path("r20.onnx.json").read_text())
    assert side["classes"][0] == "airplane" and side["mean"] == [0.485, 0.456, 0.406] and side["image_size"] == 32
    assert side["verification"]["top1_identical"] is True and side["file"] == "r20.onnx"
    assert sorted(p.name for p in Path.cwd().glob("*r20.onnx*")) == ["r20.onnx", "r20.onnx.json"]  # no partial left
    # an export that disagrees with PyTorch (a tolerance no float export meets) is an error and writes nothing
    with pytest.raises(SystemExit):
        cli(["export", imported, "--format", "onnx", "--out", "bad.onnx", "--verify", "8", "--tolerance", "0",
             "--no-progress"])
    assert "nothing was written" in capsys.readouterr().err and not list(Path.cwd().glob("*bad.onnx*"))
    # independently of the command: onnxruntime vs PyTorch on 100 other real test images
    opened = open_model(imported)
    x = opened.prep.tensor(cifar.test_x[5000:5100])
    with torch.no_grad():
        ref = opened.module(x).numpy()
    got = ort.InferenceSession("r20.onnx", providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(ref - got).max() < 1e-3
    assert (ref.argmax(1) == got.argmax(1)).all()


@pytest.mark.slow
def test_export_pt2_loads_back_and_agrees(imported, capsys):
    cli(["export", imported, "--format", "pt2", "--out", "r20.pt2", "--verify", "32", "--no-progress"])
    assert "top-1 identical on 32/32" in capsys.readouterr().out
    program = torch.export.load("r20.pt2").module()
    assert program(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
