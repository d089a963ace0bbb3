"""The demo's session store (two small models trained on real data and registered as champions) and a
`reslab demo` server on it, for tests/test_demo.py and tests/test_demo_security.py.

A plugin (``pytest_plugins`` in conftest.py), not fixtures imported into each module: pytest keeps one
definition of a fixture per module that holds it, so an imported session fixture is built once per
importing module, and the store's two trainings ran twice."""

from __future__ import annotations

import pytest

from conftest import free_port

# Small enough for the test budget on 2 CPU cores, big enough to be well above chance.
# FER-2013 learns slowly: plain flips instead of its default heavy albumentations, 40x40 training crops as
# its recipe uses (47 s instead of 76-81 s on one AVX2 thread; validation 40.1% against 43.6%, served 33.4%
# on the balanced sample where the bar is 21.4%), and its full test evaluation is skipped to stay in budget
# (its model card then shows "n/a", which is tested too).
TRAIN = {
    "cifar10": dict(model="resnet9", model_args={"width": 16}, subset=2500, epochs=2),
    "fer2013": dict(model="resnet9", model_args={"width": 16}, subset=4000, epochs=3, augment="flip", crop_size=40,
                    evaluate_test=False),
}


@pytest.fixture(scope="session")
def store(tmp_path_factory, data_dir, cifar, fer):
    """A temp MLflow store holding one registered champion per dataset, trained here on real data."""
    from train.config import TrainConfig
    from train.run import train_and_log

    root = tmp_path_factory.mktemp("demo-store")
    env = {"RESLAB_MLRUNS": str(root / "mlruns"), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
           "RESLAB_DATA": str(data_dir)}
    trained = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.chdir(root)
        for dataset, opts in TRAIN.items():
            cfg = TrainConfig(dataset=dataset, batch_size=64, progress=False, **opts).resolved()
            trained[dataset] = train_and_log(cfg, register=f"{dataset}-resnet")
    return {"env": env, "root": root, "trained": trained}


@pytest.fixture
def in_store(store, monkeypatch):
    """Point MLflow (and anything reading the environment) at the session's store for one test."""
    from train.tracking import setup_tracking

    for k, v in store["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(store["root"])
    setup_tracking(store["env"]["MLFLOW_TRACKING_URI"])
    return store


@pytest.fixture(scope="module")
def server(store):
    """`reslab demo` as the command builds it, on a free loopback port."""
    from demo.app import build_app, launch, load_models
    from train.tracking import setup_tracking

    with pytest.MonkeyPatch.context() as mp:
        for k, v in store["env"].items():
            mp.setenv(k, v)
        mp.chdir(store["root"])
        setup_tracking(store["env"]["MLFLOW_TRACKING_URI"])
        app = build_app(load_models(None))
        launch(app, port=free_port(), block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.local_url, verbose=False)
