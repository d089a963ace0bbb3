"""A logged model, found by what a user types: ``models:/name@alias``, ``models:/name/3``,
``runs:/<run id>/model``, a bare run id, or a downloaded model folder. Loads the network pickle-free
from its safetensors weights, with its preprocessing (see docs/using-models.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from torch import nn

from .config import champion_uri
from .preprocess import Preprocessing
from .tracking import rebuild_module, resolve_model_uri

def default_model_uri(dataset: str) -> str:
    return champion_uri(dataset)


@dataclass
class OpenedModel:
    uri: str
    module: nn.Module
    prep: Preprocessing
    config: dict[str, Any]
    local: Path  # the downloaded model folder
    model_id: str | None  # MLflow 3 LoggedModel id (for linking metrics)
    name: str = ""  # registered name and version, when the URI went through the registry
    version: str = ""


def open_model(model: str) -> OpenedModel:
    uri = resolve_model_uri(model)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri)) if not Path(uri).is_dir() else Path(uri)
    except MlflowException as e:
        raise ValueError(f"no model at {uri} ({str(e).splitlines()[0][:160]}); list them with `reslab ui` or "
                         "register one with `reslab train --register NAME` / `reslab import`") from None
    if not (local / "extra_files" / "model_config.json").exists():
        raise ValueError(f"{uri} is not a reslab model (no extra_files/model_config.json); re-log it with `reslab train`")
    module, config = rebuild_module(str(local))
    model_id = mlflow.models.Model.load(str(local)).model_id
    name = version = ""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if m:
        client = mlflow.MlflowClient()
        n, alias, v = m.groups()
        mv = client.get_model_version_by_alias(n, alias) if alias else client.get_model_version(n, v)
        name, version = mv.name, str(mv.version)
        model_id = getattr(mv, "model_id", None) or model_id
    return OpenedModel(uri, module, Preprocessing.from_metadata(config, uri), config, local, model_id, name, version)
