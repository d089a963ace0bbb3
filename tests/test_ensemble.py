"""``--ensemble N``: N networks trained side by side within one run, logged, tested and served as one
(train/models.py ``Ensemble``, the engine's per-member loss), on real FER-2013 images."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from train.config import TrainConfig
from train.augment import normalize
from train.data import stratified_subset
from train.engine import class_weights, make_stepper
from train.models import Ensemble, create_model

from conftest import DATA_DIR
from tests.test_train import StopAfter

TINY = {"model": "resnet9", "model_args": {"width": 8}}


def _faces(fer, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = normalize(torch.from_numpy(fer.train_x[start:start + n]), torch.tensor(fer.mean), torch.tensor(fer.std), False)
    return x, torch.from_numpy(fer.train_y[start:start + n]).long()


def test_an_ensemble_answers_with_its_members_mean_probabilities(fer):
    torch.manual_seed(0)
    model = create_model("resnet9", fer.num_classes, 1, width=8, ensemble=3)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    x, _ = _faces(fer, 32)
    model.eval()
    with torch.no_grad():
        answer = model(x)
        by_hand = torch.stack([m(x).softmax(1) for m in model.members]).mean(0)
        torch.testing.assert_close(answer.exp(), by_hand, rtol=0, atol=1e-6)
        assert answer.shape == (32, fer.num_classes)
        # Grad-CAM's view: every member's last feature map, side by side
        assert model.features(x).shape[1] == 3 * model.members[0].features(x).shape[1]
        model.train()
        assert model(x).shape == (3, 32, fer.num_classes)  # training: each member's own logits
    members = [p.detach().clone() for p in model.members[0].parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(members, model.members[1].parameters()))  # own random starts
    assert create_model("resnet9", 7, 1, width=8, ensemble=1).__class__.__name__ == "ResNet9"
    with pytest.raises(ValueError, match="whole number of networks"):
        create_model("resnet9", 7, 1, ensemble=0)


def test_each_member_learns_as_if_it_were_trained_alone(fer):
    """Two steps of the ensemble move every member exactly as two steps of that member alone would (the second
    step carries the first one's momentum): weights and BatchNorm statistics, with class weights and label
    smoothing on."""
    torch.manual_seed(1)
    ensemble = create_model("resnet9", fer.num_classes, 1, width=8, ensemble=2)
    alone = [copy.deepcopy(m) for m in ensemble.members]
    cfg = TrainConfig(dataset="fer2013", **TINY, lr=0.1, batch_size=48, weight_decay=5e-4, momentum=0.9,
                      nesterov=True, schedule="constant", label_smoothing=0.1).resolved()
    weight = class_weights(fer.train_y, fer.num_classes, 0.5)
    device = torch.device("cpu")
    x, y = _faces(fer, 48)
    x2, y2 = _faces(fer, 48, start=48)
    step = make_stepper(cfg, ensemble, 10, device, "fp32", weight=weight)
    losses = [step(x, y)[0].item(), step(x2, y2)[0].item()]
    solo = []
    for member in alone:
        one = make_stepper(cfg, member, 10, device, "fp32", weight=weight)
        solo.append([one(x, y)[0].item(), one(x2, y2)[0].item()])
    for trained, reference in zip(ensemble.members, alone):
        for (name, p), q in zip(trained.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the loss it reports is its members' mean, comparable with one network's
    assert losses == pytest.approx(np.mean(solo, axis=0).tolist(), rel=1e-5)


def test_an_ensemble_run_is_logged_tested_served_and_exported_as_one(fer, mlflow_store, in_process, tmp_path,
                                                                     monkeypatch):
    from demo.gradcam import forward_with_cam
    from demo.serving import ServedModel
    from train.evaluate import evaluate, format_report, predict_arrays
    from train.export import export_model, run_exported
    from train.usemodel import open_model

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset")  # restored to its absence afterwards
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")  # as in a user's shell: the command decides
    tiny = Path(__file__).with_name("tiny-resnet9.yaml")
    out = in_process(["train", "--dataset", "fer2013", "--config", str(tiny), "--ensemble", "2",
                      "--subset", "1400", "--epochs", "1", "--batch-size", "64", "--crop-size", "40", "--ema", "0.9",
                      "--tta", "1", "--no-progress", "--seed", "4"], tmp_path / "mlruns")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained an ensemble of 2 resnet9 on fer2013" in out.stdout
    assert "Downloading artifacts" not in out.stdout + out.stderr  # MLflow reading its files back: no bars
    mlflow.set_tracking_uri(mlflow_store)
    (logged,) = mlflow.search_logged_models(
        experiment_ids=[e.experiment_id for e in mlflow.search_experiments()], output_format="list")
    run = mlflow.get_run(logged.source_run_id)
    assert run.data.params["model_args.ensemble"] == "2"
    m = run.data.metrics
    assert 0.0 < m["test_acc"] <= 1.0
    # FER-2013's test parts (PrivateTest is what its literature quotes), 3,589 images each: logged and printed
    assert (m["test_acc_privatetest"] + m["test_acc_publictest"]) / 2 == pytest.approx(m["test_acc"], abs=1e-6)
    assert m["test_acc_privatetest"] != m["test_acc_publictest"] and "f1_macro_privatetest" in " ".join(m)
    assert f"(PrivateTest {m['test_acc_privatetest']:.4f}, PublicTest {m['test_acc_publictest']:.4f})" in out.stdout
    from train.results import result_from_run  # and `reslab results export` keeps them as data

    assert result_from_run(mlflow.MlflowClient(), run)["test_acc_parts"] == {
        "privatetest": m["test_acc_privatetest"], "publictest": m["test_acc_publictest"]}

    served = ServedModel(logged.model_uri)  # rebuilt from the logged weights and config, as the demo does
    assert isinstance(served.module, Ensemble) and len(served.module.members) == 2 and served.gradcam_ok
    seen = list(fer.test_x[:64])
    probs = served.probabilities(seen)
    with torch.no_grad():
        members = torch.stack([m(served.tensor(seen)).softmax(1) for m in served.module.members])
    np.testing.assert_allclose(probs, members.mean(0).numpy(), rtol=0, atol=1e-5)
    assert (members[0].argmax(1) != members[1].argmax(1)).any() or not torch.allclose(members[0], members[1])

    logits, cams = forward_with_cam(served.module, served.tensor(seen[:4]), [0, 1, 2, 3])
    np.testing.assert_allclose(logits.softmax(1).numpy(), probs[:4], rtol=0, atol=1e-5)
    assert cams.shape == (4, 48, 48) and np.isfinite(cams).all() and cams.max() > 0

    # reslab export: the ensemble as one ONNX graph that answers with the members' mean probabilities
    opened = open_model(logged.model_uri)
    # reslab evaluate: each part's accuracy is the model's on exactly that part's images, as the zip names them
    report = evaluate(opened, fer, limit=700, progress=False)  # a stratified subset, its parts within it
    keep = np.sort(stratified_subset(fer.test_y, 700))
    right = predict_arrays(opened, fer.test_x[keep], progress=False).argmax(1) == fer.test_y[keep]
    with zipfile.ZipFile(DATA_DIR / "fer2013.zip") as z:  # the loader's order: class folders, then names, sorted
        names = np.array([n for _, n in sorted((n.split("/")[1], n) for n in z.namelist() if n.startswith("test/"))])
    for part in ("PrivateTest", "PublicTest"):
        mine = np.char.startswith(np.char.rpartition(names[keep], "/")[:, 2], part + "_")
        assert report["parts"][part]["images"] == mine.sum() > 300
        assert report["parts"][part]["accuracy"] == pytest.approx(right[mine].mean(), abs=1e-9), part
    assert report["parts"]["PrivateTest"]["accuracy"] != report["parts"]["PublicTest"]["accuracy"]
    assert f"PrivateTest ({report['parts']['PrivateTest']['images']} images): accuracy " \
           f"{report['parts']['PrivateTest']['accuracy']:.4f}" in format_report(report)
    onnx_file = export_model(opened, "onnx", tmp_path / "ensemble.onnx")
    exported = run_exported(onnx_file, "onnx", served.tensor(seen).numpy())
    np.testing.assert_allclose(np.exp(exported), members.mean(0).numpy(), rtol=0, atol=1e-4)


def test_ensemble_flag_errors_and_recipe_override(tmp_path, capsys):
    from train.cli import build_parser, config_from_args

    def cfg(*flags: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", "--dataset", "fer2013", *flags]))

    assert cfg("--recipe", "fast-cpu", "--ensemble", "2").model_args == {"width": 32, "ensemble": 2}
    (tmp_path / "two.yaml").write_text("model: resnet9\nmodel_args: {width: 16, ensemble: 2}\n")
    assert cfg("--config", str(tmp_path / "two.yaml"), "--ensemble", "1").model_args == {"width": 16}
    for flags, message in ((["--ensemble", "0"], "--ensemble takes the number of networks"),
                           (["--ensemble", "2", "--pretrained", "w.pt"], "each start from their own random weights")):
        with pytest.raises(SystemExit):
            cfg(*flags)
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_an_interrupted_ensemble_run_resumes_exactly(fer, tmp_path):
    """Interrupted after epoch 1 of 2 and resumed == uninterrupted: every member's weights, BatchNorm statistics
    and EMA come back from the checkpoint, and the resumed run ends with the same metrics."""
    from train.engine import fit

    base = TrainConfig(dataset="fer2013", model="resnet9", model_args={"width": 8, "ensemble": 2}, subset=900,
                       val_fraction=0.2, epochs=2, batch_size=64, lr=0.2, ema=0.9, crop_size=40, seed=3,
                       evaluate_test=False, progress=False)
    full = fit(TrainConfig(**{**base.to_dict(), "checkpoint_dir": str(tmp_path / "a")}), fer)

    def stop(epoch, metrics):  # epoch counts from 0
        if epoch == 0:
            raise StopAfter

    interrupted = TrainConfig(**{**base.to_dict(), "checkpoint_dir": str(tmp_path / "b")})
    with pytest.raises(StopAfter):
        fit(interrupted, fer, callbacks=[stop])
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = fit(interrupted, fer, resume=tmp_path / "b")
    assert isinstance(resumed.model, Ensemble) and len(resumed.history) == 2
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert resumed.history[-1][key] == full.history[-1][key], key
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
