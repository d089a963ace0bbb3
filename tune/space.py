"""The search space: Optuna distributions over :class:`train.config.TrainConfig` fields.

By default exactly three dimensions are searched (learning rate, batch size, weight decay), around
the base configuration's values (its recipe). The learning rate is coupled to the batch size: the
searched ``lr`` is the peak rate for the base's batch size, and a trial with another batch size
trains at ``lr * batch_size / base batch size`` (the linear scaling rule), so the two dimensions
stay independent for the sampler. A YAML file (``--space``) adds or overrides dimensions without code
changes; each key is a TrainConfig field and its value says how to search it::

    lr: {low: 0.02, high: 0.4, log: true}     # float range (log-uniform with log: true)
    batch_size: [64, 128, 256]                 # a list: categorical choices
    label_smoothing: {low: 0.0, high: 0.2}
    aug_strength: {low: 0.5, high: 1.5}
    model: [resnet20, resnet32, resnet44]      # depth as a searched dimension
    epochs: 5                                  # a scalar: fixed, not searched
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from train.config import TrainConfig, load_yaml
from train.data import DATASETS
from train.models import list_models

# Fields a search must not touch: they decide what data the study is about or how it is run.
NOT_SEARCHABLE = {"dataset", "data", "download", "val_fraction", "evaluate_test", "progress", "checkpoint_dir", "device"}

BATCH_FACTORS = (0.25, 0.5, 1.0)  # batch sizes searched: these multiples of the base's (128 -> 32, 64, 128)


def default_distributions(base: TrainConfig) -> dict[str, BaseDistribution]:
    """lr and weight decay log-uniform around the base's values; batch sizes at and below the base's
    (smaller batches take more steps, which a short CPU budget can afford)."""
    if base.optimizer == "adamw":  # decoupled decay: larger values, smaller steps
        lr, wd = FloatDistribution(3e-4, 1e-2, log=True), FloatDistribution(1e-4, 1e-1, log=True)
    else:  # SGD with Nesterov momentum and a one-cycle schedule, around the recipe's values
        lr = FloatDistribution(base.lr / 5, base.lr * 2.5, log=True)
        wd = FloatDistribution(max(base.weight_decay, 1e-5) / 10, max(base.weight_decay, 1e-5) * 5, log=True)
    sizes = sorted({max(8, int(base.batch_size * f)) for f in BATCH_FACTORS})
    return {"lr": lr, "batch_size": CategoricalDistribution(sizes), "weight_decay": wd}


def _distribution(key: str, spec: Any) -> BaseDistribution:
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"search space: {key} has an empty list of choices")
        return CategoricalDistribution(spec)
    if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
        raise ValueError(f"search space: {key} must be a scalar (fixed), a list (choices) or {{low, high[, log, step]}}")
    unknown = set(spec) - {"low", "high", "log", "step", "type"}
    if unknown:
        raise ValueError(f"search space: {key} has unknown keys {sorted(unknown)}")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    kind = spec.get("type") or ("int" if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) else "float")
    if kind == "int":
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    if kind == "float":
        return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))
    raise ValueError(f"search space: {key} has unknown type {kind!r} (int or float)")


@dataclass
class SearchSpace:
    """Searched dimensions plus fixed overrides, both keyed by TrainConfig field."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any] = field(default_factory=dict)
    lr_batch: int | None = None  # the batch size the searched lr is for (None: not coupled)
    from_file: set[str] = field(default_factory=set)  # dimensions the user's --space file set

    @classmethod
    def build(cls, base: TrainConfig, path: str | Path | None = None) -> SearchSpace:
        base = base.resolved()
        space = cls(default_distributions(base), lr_batch=base.batch_size)
        if path is None:
            return space
        p = Path(path)
        spec = load_yaml(p, "search-space file", "TrainConfig fields")
        space.from_file = set(spec)
        fields = set(TrainConfig.__dataclass_fields__)
        for key, value in spec.items():
            if key not in fields or key in NOT_SEARCHABLE:
                raise ValueError(f"{p}: {key!r} is not a searchable training option")
            space.distributions.pop(key, None)
            space.fixed.pop(key, None)
            if isinstance(value, (list, dict)) and key not in ("milestones", "model_args"):
                space.distributions[key] = _distribution(key, value)
            else:
                space.fixed[key] = value
        space.check_models()
        if not {"lr", "batch_size"} <= set(space.distributions):
            space.lr_batch = None  # coupling only when both are searched
        space.check_values(base)
        return space

    def check_values(self, base: TrainConfig) -> None:
        """Every value the space can give (its fixed values, each choice, each range's ends), and every pair of them,
        makes a valid configuration: a bad one is one error line before anything runs, not a study stopped at the
        first trial that draws it. Pairs, since options limit each other (``crop_size: [0, 40]`` with ``crop_pad: [0,
        4]`` on CIFAR-10's 32-px images: a 40-px crop needs the padding), and against the dataset's image size.
        Pairs suffice for the rules TrainConfig has: the crop rule spans three options (size, padding, augment), but a
        failing triple fails as one of its pairs (with the base's third value) too, so no triple is tried."""
        info = DATASETS.get(base.dataset)
        values = {name: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
                  for name, d in self.distributions.items()}
        tried: list[tuple[str, dict[str, Any]]] = [("its fixed values", {})]
        tried += [(f"{name} = {v!r}", {name: v}) for name, vs in values.items() for v in vs]
        tried += [(f"{a} = {va!r} with {b} = {vb!r}", {a: va, b: vb})
                  for a, b in itertools.combinations(values, 2) for va in values[a] for vb in values[b]]
        for what, params in tried:
            try:
                cfg = self.config(base, params)
                if info:
                    cfg.check_image_size(info.image_size)
            except (ValueError, TypeError) as e:
                from train.tracking import first_line  # only on this error: mlflow stays out of start-up

                raise ValueError(f"search space: {what}: {first_line(e)}") from None

    def check_models(self) -> None:
        dist = self.distributions.get("model")
        names = list(dist.choices) if isinstance(dist, CategoricalDistribution) else [self.fixed.get("model")]
        unknown = [n for n in names if n is not None and n not in list_models()]
        if unknown:
            raise ValueError(f"search space: unknown model(s) {unknown}; see `reslab train --list-models`")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask the trial for every dimension, through Optuna's public suggest API."""
        out: dict[str, Any] = {}
        for name, d in self.distributions.items():
            if isinstance(d, CategoricalDistribution):
                out[name] = trial.suggest_categorical(name, d.choices)
            elif isinstance(d, IntDistribution):
                out[name] = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
            else:
                out[name] = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        return out

    def config(self, base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
        """The trial's configuration: base < fixed overrides < sampled values (lr scaled to the batch)."""
        merged = {**base.to_dict(), **self.fixed, **params}
        if self.lr_batch and "lr" in params and "batch_size" in params:
            merged["lr"] = params["lr"] * params["batch_size"] / self.lr_batch
        return TrainConfig.from_dict(merged).resolved()

    def pins(self, base: TrainConfig, batch_size_searched: bool) -> dict[str, Any]:
        """Values an invocation's trials take instead of sampling them: the base's batch size when the
        budget's trials are too short to rank batch sizes (tune/budget.py), unless the --space file asks
        for it. Pinned, not removed: the study keeps one search space across invocations and workers."""
        d, batch = self.distributions.get("batch_size"), base.resolved().batch_size
        if batch_size_searched or "batch_size" in self.from_file or not isinstance(d, CategoricalDistribution) \
                or batch not in d.choices:
            return {}
        return {"batch_size": batch}

    def base_params(self, base: TrainConfig) -> dict[str, Any]:
        """The base configuration's own values of the searched dimensions (a study's first trial),
        where they lie inside the space."""
        base = base.resolved()
        out: dict[str, Any] = {}
        for name, d in self.distributions.items():
            v = getattr(base, name, None)
            if isinstance(d, CategoricalDistribution) and v in d.choices:
                out[name] = v
            elif isinstance(d, (FloatDistribution, IntDistribution)) and v is not None and d.low <= v <= d.high:
                out[name] = v
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description, logged on the study's parent run."""
        return {
            "searched": {k: distribution_to_json(d) for k, d in self.distributions.items()},
            "fixed": dict(self.fixed),
            "lr_for_batch": self.lr_batch,  # the searched lr is for this batch size, scaled linearly
        }
