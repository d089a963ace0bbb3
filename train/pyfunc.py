"""The REST face of a logged reslab model: ``mlflow models serve`` (and ``mlflow.pyfunc.load_model``)
answer image bytes as well as preprocessed tensors with class names and probabilities.

A reslab model is logged once, with two flavors in its ``MLmodel``:

- ``pytorch``: the pt2 program, ``extra_files/weights.safetensors`` and ``extra_files/model_config.json``,
  written by ``mlflow.pytorch.save_model`` exactly as before (the demo, ``reslab predict`` and
  ``mlflow.pytorch.load_model`` read these);
- ``python_function``: this module as its loader. It rebuilds the network with the registry's
  ``create_model`` from the safetensors weights and the JSON config (nothing is unpickled) and
  preprocesses images with :mod:`train.preprocess`, from the model's own metadata.

The signature has two optional columns: ``image`` (binary; base64 in JSON, decoded by MLflow's scoring
server) and ``tensor`` ((C, S, S) floats, already normalised). Each answer row has ``class``,
``probability`` (of that class) and ``probabilities`` (every class name -> probability).
The serving environment needs reslab installed (``--env-manager local`` from reslab's venv).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGE, TENSOR = "image", "tensor"
LOADER = __name__  # "train.pyfunc"


# --------------------------------------------------------------------------- serving side


class ImageClassifier:
    """What ``mlflow.pyfunc`` wraps: ``predict(DataFrame with image and/or tensor columns)``."""

    def __init__(self, module: Any, config: dict[str, Any]) -> None:
        from .preprocess import Preprocessing

        self.module, self.prep = module, Preprocessing.from_metadata(config, "the served model")

    def _row_input(self, i: int, image: Any, tensor: Any) -> np.ndarray:
        """One request row -> one normalised (C, S, S) float32 array; ValueError says why not."""
        from .images import decode_image

        c, s = self.prep.channels, self.prep.image_size
        if _present(image):
            if isinstance(image, str):  # a Python caller's base64 string (the REST server decodes for us)
                try:
                    image = base64.b64decode(image, validate=False)
                except (binascii.Error, ValueError):
                    raise ValueError(f"row {i}: '{IMAGE}' is neither image bytes nor base64") from None
            if not isinstance(image, bytes | bytearray):
                raise ValueError(f"row {i}: '{IMAGE}' must be image bytes (base64 in JSON), got {type(image).__name__}")
            try:
                seen = self.prep.to_model_input(decode_image(bytes(image), self.prep.channels).rgb)
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from None
            return self.prep.tensor(seen[None])[0].numpy()
        if _present(tensor):
            try:
                t = np.asarray(tensor, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError(f"row {i}: '{TENSOR}' is not an array of numbers") from None
            if t.shape != (c, s, s):
                raise ValueError(f"row {i}: '{TENSOR}' has shape {t.shape}; this model takes ({c}, {s}, {s}), normalised")
            return t
        raise ValueError(f"row {i}: neither '{IMAGE}' (base64 image bytes) nor '{TENSOR}' ({c}x{s}x{s} floats) given")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if df.empty or not ({IMAGE, TENSOR} & set(df.columns)):
            raise MlflowException(f"expected rows with a column '{IMAGE}' (base64 image bytes) or '{TENSOR}' "
                                  f"(normalised {self.prep.channels}x{self.prep.image_size}x{self.prep.image_size} floats); "
                                  f"got columns {list(df.columns)}", INVALID_PARAMETER_VALUE)
        images, tensors = df.get(IMAGE, pd.Series([None] * len(df))), df.get(TENSOR, pd.Series([None] * len(df)))
        try:
            batch = np.stack([self._row_input(i, a, b) for i, (a, b) in enumerate(zip(images, tensors))])
        except ValueError as e:
            raise MlflowException(str(e), INVALID_PARAMETER_VALUE) from None
        with torch.inference_mode():
            probs = torch.softmax(self.module(torch.from_numpy(batch)).float(), dim=1).numpy().astype(float)
        classes = list(self.prep.classes)
        top = probs.argmax(1)
        return pd.DataFrame({"class": [classes[k] for k in top], "probability": probs[np.arange(len(top)), top],
                             "probabilities": [dict(zip(classes, p.tolist())) for p in probs]})


def _present(v: Any) -> bool:
    """A cell that holds something (pandas fills a missing column cell with None or NaN)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return False
    return not (isinstance(v, str) and not v)


def load_network(folder: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The network from ``folder/model_config.json`` + ``folder/weights.safetensors`` (no pickle)."""
    from safetensors.torch import load_file

    from .models import create_model

    folder = Path(folder)
    config = json.loads((folder / "model_config.json").read_text())
    module = create_model(str(config["architecture"]), len(config["classes"]), int(config["channels"]),
                          **dict(config.get("model_args") or {}))
    module.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return module.eval(), config


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ImageClassifier:
    """The pyfunc loader MLflow calls with the model's ``extra_files`` folder."""
    return ImageClassifier(*load_network(data_path))


# --------------------------------------------------------------------------- logging side


def image_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Map, Schema

    tensor = Array(Array(Array(DataType.double)))  # JSON numbers; cast to float32 for the network
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE, required=False), ColSpec(tensor, TENSOR, required=False)]),
        outputs=Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "probability"),
                        ColSpec(Map(DataType.double), "probabilities")]),
    )


def example_image(size: int, channels: int) -> bytes:
    """A small PNG of the model's size (a gradient) as the logged input example."""
    import cv2

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)], -1)
    ok, png = cv2.imencode(".png", rgb[..., :1] if channels == 1 else rgb[..., ::-1])
    assert ok
    return png.tobytes()


class _PytorchWithImageServing:
    """A flavor module for ``Model.log``: ``mlflow.pytorch.save_model`` unchanged, then the
    ``python_function`` flavor, signature and input example swapped for the image-serving ones."""

    __name__ = "mlflow.pytorch"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow
        from mlflow import pyfunc
        from mlflow.models.utils import _save_example

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        meta = mlflow_model.metadata or {}
        mlflow_model.flavors.pop(pyfunc.FLAVOR_NAME, None)
        pyfunc.add_to_model(mlflow_model, loader_module=LOADER, data="extra_files",
                            conda_env="conda.yaml", python_env="python_env.yaml")
        mlflow_model.signature = image_signature()
        example = example_image(int(meta.get("image_size", 32)), int(meta.get("channels", 3)))
        _save_example(mlflow_model, pd.DataFrame({IMAGE: [example]}), path)
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(pytorch_model: Any, **kwargs: Any) -> Any:
    """``mlflow.pytorch.log_model`` with the same arguments, plus image serving (see the module doc)."""
    from mlflow.models import Model

    return Model.log(artifact_path=None, flavor=_PytorchWithImageServing, pytorch_model=pytorch_model, **kwargs)
