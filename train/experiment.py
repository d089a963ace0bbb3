"""``reslab experiment degradation``: He et al. 2015, Figure 6 / Table 6 on CIFAR-10, as tracked runs.

Plain and residual networks of the same depths train with ONE shared recipe, each as a child run
nested under one MLflow parent run. The parent receives the paper-style figure (training error
dashed, test error solid, against iterations; plain nets left, ResNets right) and the table.

Curves: by default the per-epoch "test error" curve is measured, as in the paper, on a fixed
stratified sample of the test split. It is drawn, never used: nothing here selects an epoch, a
model or a hyperparameter from it. ``--curves val`` draws validation error instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cli import add_train_args, config_from_args
from .config import TrainConfig, load_yaml, recipe
from .redact import mask_secrets

DEFAULT_DEPTHS = (20, 56)

# Each preset is one recipe file shared by every network (train/recipes/degradation-<preset>.yaml);
# explicit flags override it.
PRESETS = ("cpu", "paper")


def preset(name: str, dataset: str = "cifar10") -> dict[str, Any]:
    return recipe(f"degradation-{name}", dataset)


# Size of the test-split sample the per-epoch curve is measured on (None: the whole split).
PRESET_CURVE_IMAGES = {"cpu": 1000, "paper": None}


# --------------------------------------------------------------------------- CLI


def add_experiment_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproduce the ResNet paper's experiments as tracked runs",
                       description="Reproduce experiments of He et al. 2015 as nested MLflow runs.")
    exp = p.add_subparsers(dest="experiment_name", metavar="EXPERIMENT", required=True)
    d = exp.add_parser(
        "degradation", help="plain vs residual nets of the same depths (Figure 6, Table 6)",
        description="Train plain and residual networks of the same depths with one shared recipe, as child runs "
        "of one MLflow parent run; log the paper-style figure (training error dashed, test error solid, against "
        "iterations) and a table (depth, parameters, final training error, test error). Presets: 'cpu' "
        f"({_describe_preset('cpu')}; under 30 minutes on 2 cores), 'paper' ({_describe_preset('paper')}; "
        "for a GPU). Training flags override the preset; unset ones take the preset's value.",
    )
    g = d.add_argument_group("experiment")
    g.add_argument("--preset", choices=PRESETS, default="cpu", help="shared recipe (default: cpu)")
    g.add_argument("--depths", type=int, nargs="+", default=list(DEFAULT_DEPTHS), metavar="D",
                   help="depths 6n+2 to train, each as plainD and resnetD (default: 20 56; the paper also has 32 44 110)")
    g.add_argument("--curves", choices=["test", "val"], default="test",
                   help="held-out curve in the figure: 'test' (as in the paper; a sample of the test split, drawn "
                   "only, never used for selection) or 'val' (validation split carved from train) (default: test)")
    g.add_argument("--curve-images", type=int, metavar="N",
                   help="measure the per-epoch test curve on a stratified sample of N test images "
                   "(default: 1000 for --preset cpu, all for paper)")
    g.add_argument("--test-images", type=int, metavar="N",
                   help="final test error on a stratified sample of N test images (default: the whole test split)")
    g.add_argument("--experiment", help="MLflow experiment (default: degradation-<dataset>)")
    g.add_argument("--run-name", help="name of the parent run")
    g.add_argument("--no-log-models", dest="log_models", action="store_false",
                   help="do not log each trained network as an MLflow model (faster)")
    g.add_argument("--output", metavar="DIR", help="also write degradation.png/.md/.json into DIR")
    add_train_args(d, show_defaults=False)  # `reslab train`'s defaults do not apply: the preset decides
    d.set_defaults(func=cmd_degradation)


def _describe_preset(name: str) -> str:
    p = preset(name)
    if p.get("max_steps"):
        length = f"{p['max_steps']} iterations, lr {p['lr']} /10 at {', '.join(str(int(m)) for m in p['milestones'])}"
    else:
        length = (f"{p['subset']}-image stratified train subset, {p['epochs']} epochs, lr {p['lr']} /10 at "
                  f"{', '.join(f'{m:.0%}' for m in p['milestones'])} of training")
    return f"{length}, batch {p['batch_size']}, weight decay {p['weight_decay']:g}, momentum {p['momentum']}"


def shared_config(args: argparse.Namespace) -> TrainConfig:
    """Preset < --recipe < --config < explicit flags: the one recipe every network trains with."""
    for flag in ("model", "init_from", "pretrained"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} does not apply: the experiment trains plainD and resnetD for each of --depths")
    dataset = args.dataset or "cifar10"
    shared = dict(preset(args.preset, dataset))
    if args.curves == "val":
        shared["val_fraction"] = 0.1
    from_files: set[str] = set()
    if args.recipe:
        from_files |= set(recipe(args.recipe, dataset))
    if args.config:
        from_files |= set(load_yaml(args.config))
    for key, value in shared.items():
        if getattr(args, key, None) is None and key not in from_files:
            setattr(args, key, value)
    cfg = config_from_args(args)
    if args.curves == "val" and not cfg.val_fraction:
        raise ValueError("--curves val needs a validation split; give --val-fraction > 0")
    return cfg


def model_names(depths: list[int]) -> list[tuple[str, str, int]]:
    """(family, model name, depth) for every network of the experiment, shallow first."""
    from .models import CIFAR_DEPTHS

    bad = [d for d in depths if d not in CIFAR_DEPTHS]
    if bad:
        raise ValueError(f"depth {bad[0]} has no plain/residual pair; choose from {', '.join(map(str, CIFAR_DEPTHS))}")
    return [(fam, f"{prefix}{d}", d) for d in sorted(set(depths)) for fam, prefix in (("plain", "plain"), ("residual", "resnet"))]


def cmd_degradation(args: argparse.Namespace) -> None:
    cfg = shared_config(args)
    nets = model_names(args.depths)
    curve_images = args.curve_images if args.curve_images is not None else PRESET_CURVE_IMAGES[args.preset]
    if args.preset == "paper" and cfg.device in ("auto", "cpu"):
        import torch

        if not torch.cuda.is_available():
            print("reslab: warning: --preset paper trains every network for 64k iterations; meant for a GPU", flush=True)
    run_degradation(cfg, nets, preset=args.preset, curves=args.curves, curve_images=curve_images,
                    test_images=args.test_images, experiment=args.experiment, run_name=args.run_name,
                    log_models=args.log_models, output=args.output)


# --------------------------------------------------------------------------- the experiment


def sample_split(x: np.ndarray, y: np.ndarray, n: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified sample of ``n`` images (all of them when n is None or too large)."""
    from .data import stratified_subset

    if n is None or n >= len(y):
        return x, y
    idx = np.sort(stratified_subset(y, n, seed))
    return x[idx], y[idx]


class TestCurve:
    """Engine callback: the error of each epoch's weights on a fixed test sample, for the figure only.

    The engine hands callbacks metrics, not the model, so the weights come from the checkpoint it
    writes at the end of every epoch (before the callbacks run).
    """

    def __init__(self, cfg: TrainConfig, data: Any, x: np.ndarray, y: np.ndarray) -> None:
        from .engine import Runtime, build_model

        self.cfg, self.x, self.y = cfg, x, y
        self.rt = Runtime.create(cfg, data)
        self.model = self.rt.place(build_model(cfg, data))
        self.errors: list[float] = []

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        import mlflow

        from .engine import evaluate, load_checkpoint

        ck = load_checkpoint(self.cfg.checkpoint_dir)
        # the weights the engine evaluates (with --ema, the average: an AveragedModel's "module." entries) and its
        # TTA, so that the curve's last point is the table's test error
        ema = {k.removeprefix("module."): v for k, v in (ck.get("ema") or {}).items() if k.startswith("module.")}
        self.model.load_state_dict(ema or ck["model"])
        r = evaluate(self.model, self.x, self.y, self.rt, self.cfg.tta)
        self.errors.append(1.0 - r.accuracy)
        mlflow.log_metric("curve_test_error", 1.0 - r.accuracy, step=int(metrics["step"]))


def curve_logger(epoch: int, metrics: dict[str, float]) -> None:
    """Engine callback: training (and validation) error against iterations, the figure's x axis."""
    import mlflow

    out = {"curve_train_error": 1.0 - metrics["train_acc"]}
    if "val_acc" in metrics:
        out["curve_val_error"] = 1.0 - metrics["val_acc"]
    mlflow.log_metrics(out, step=int(metrics["step"]))


def run_degradation(
    cfg: TrainConfig,
    nets: list[tuple[str, str, int]],
    preset: str,
    curves: str = "test",
    curve_images: int | None = None,
    test_images: int | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    log_models: bool = True,
    output: str | None = None,
) -> dict[str, Any]:
    """Train every network of ``nets`` as a child run of one parent run; log the figure and table there."""
    import mlflow

    from .data import load_dataset
    from .tracking import experiment_id, flat_params, setup_tracking

    setup_tracking()
    data = load_dataset(cfg.dataset, cfg.data, cfg.download, progress=cfg.progress)
    test_x, test_y = sample_split(data.test_x, data.test_y, test_images)
    eval_data = dataclasses.replace(data, test_x=test_x, test_y=test_y)
    curve_x, curve_y = sample_split(data.test_x, data.test_y, curve_images)
    budget = describe_budget(cfg, data, curves, len(curve_y), len(test_y))
    print(f"degradation experiment, preset {preset}: {budget}", flush=True)

    exp_id = experiment_id(experiment or f"degradation-{cfg.dataset}")
    rows: list[dict[str, Any]] = []
    series: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or f"degradation-{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={"reslab.experiment": "degradation", "preset": preset, "dataset": data.name}) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params({**{f"shared.{k}": v for k, v in flat_params(cfg).items() if k != "model"},
                           "preset": preset, "depths": " ".join(str(d) for d in sorted({d for _, _, d in nets})), "curves": curves,
                           "curve_images": len(curve_y), "test_images": len(test_y)})
        mlflow.set_tag("budget", budget)
        print(f"MLflow parent run {parent_id} in {mask_secrets(mlflow.get_tracking_uri())}", flush=True)
        for i, (family, name, depth) in enumerate(nets, 1):
            print(f"[{i}/{len(nets)}] {name}", flush=True)
            row, curve = train_child(dataclasses.replace(cfg, model=name), family, depth, data, eval_data,
                                     (curve_x, curve_y) if curves == "test" else None, exp_id, parent_id,
                                     {"curves": curves, "curve_images": len(curve_y), "test_images": len(test_y)}, log_models)
            rows.append(row)
            if curve is not None:
                series[name] = curve
                print(f"{name}: final train error {row['train_error']:.2%}, test error {row['test_error']:.2%} "
                      f"({row['train_seconds']:.0f} s)", flush=True)

        heldout = (f"test error ({len(curve_y)}-image sample of the test split; drawn only, never used for selection)"
                   if curves == "test" else "validation error")
        short = "test error" if curves == "test" else "validation error"
        notes = observations(rows)
        table = degradation_table(rows)
        text = (f"# Degradation experiment ({data.name}, preset {preset})\n\nBudget: {budget}.\n\n{table}\n\n"
                + "".join(f"- {n}\n" for n in notes))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(output) if output else Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            plot_degradation(series, out / "degradation.png", short, f"{data.name}, preset {preset}: training error (dashed), {heldout} (solid)")
            (out / "degradation.md").write_text(text)
            (out / "degradation.json").write_text(json.dumps(
                {"budget": budget, "preset": preset, "rows": rows, "curves": series, "notes": notes}, indent=1, default=str))
            for f in ("degradation.png", "degradation.md", "degradation.json"):
                mlflow.log_artifact(str(out / f))
        mlflow.log_metrics({f"{r['model']}_{k}": r[k] for r in rows for k in ("train_error", "test_error")
                            if r[k] == r[k]})
        mlflow.log_metric("total_seconds", time.perf_counter() - t_start)

    print(f"\n{table}\n")
    for n in notes:
        print(f"- {n}")
    print(f"\nfigure and table logged to parent run {parent_id} ({time.perf_counter() - t_start:.0f} s in all)"
          + (f", and written to {output}" if output else ""))
    print(f"compare the runs: reslab compare --tag mlflow.parentRunId={parent_id}")
    return {"parent_run_id": parent_id, "rows": rows, "curves": series, "notes": notes, "budget": budget}


def train_child(cfg: TrainConfig, family: str, depth: int, data: Any, eval_data: Any,
                curve_set: tuple[np.ndarray, np.ndarray] | None, exp_id: str, parent_id: str,
                extra_params: dict[str, Any], log_models: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One network as a child run of ``parent_id``: (table row, figure series or None if it diverged)."""
    import mlflow

    from .engine import DivergedError, fit, resolve_precision, select_device
    from .models import count_parameters
    from .tracking import epoch_logger, flat_params, log_fit, run_tags

    device = select_device(cfg.device)
    tags = {**run_tags(cfg, data, str(device), resolve_precision(cfg.precision, device)),
            "reslab.experiment": "degradation", "family": family, "depth": str(depth)}
    with tempfile.TemporaryDirectory() as ckpt:
        fit_cfg = dataclasses.replace(cfg, checkpoint_dir=ckpt)  # per-epoch weights, read by TestCurve
        test_curve = TestCurve(fit_cfg, data, *curve_set) if curve_set is not None else None
        try:
            with mlflow.start_run(experiment_id=exp_id, run_name=cfg.model, nested=True, parent_run_id=parent_id, tags=tags) as child:
                mlflow.log_params({**flat_params(cfg), **extra_params})
                result = fit(fit_cfg, eval_data, [epoch_logger, curve_logger] + ([test_curve] if test_curve else []))
                log_fit(result, eval_data, log_model_=log_models)
                row = summarize(family, cfg.model, depth, count_parameters(result.model), result, child.info.run_id)
                mlflow.log_metrics({"final_train_error": row["train_error"], "test_error": row["test_error"]})
        except DivergedError as e:
            print(f"{cfg.model} diverged: {e}", flush=True)
            return {"family": family, "model": cfg.model, "depth": depth, "params": None, "iterations": None,
                    "train_error": float("nan"), "test_error": float("nan"), "train_seconds": None,
                    "run_id": None, "note": "diverged"}, None
    hist = result.history
    return row, {
        "family": family, "depth": depth,
        "steps": [int(h["step"]) for h in hist],
        "train_error": [1.0 - h["train_acc"] for h in hist],
        "heldout_error": test_curve.errors if test_curve else [1.0 - h["val_acc"] for h in hist],
    }


def describe_budget(cfg: TrainConfig, data: Any, curves: str, curve_n: int, test_n: int) -> str:
    """One line saying exactly what every network trains on and for how long."""
    n_train = cfg.subset or len(data.train_y)
    n_fit = n_train - round(n_train * cfg.val_fraction) if cfg.val_fraction else n_train
    steps = cfg.max_steps or cfg.epochs * max(1, n_fit // cfg.batch_size)
    length = f"{cfg.max_steps} iterations" if cfg.max_steps else f"{cfg.epochs} epochs (~{steps} iterations)"
    ms = ", ".join(f"{int(m)}" if m > 1 else f"{m:.0%}" for m in cfg.milestones)
    sched = f"lr {cfg.lr:g} /10 at {ms}" if cfg.schedule == "step" else f"lr {cfg.lr:g} {cfg.schedule}"
    what = f"{cfg.subset}-image stratified subset of {data.name} train" if cfg.subset else f"all {len(data.train_y)} {data.name} training images"
    val = f", {cfg.val_fraction:.0%} of it held out for validation" if cfg.val_fraction else ""
    held = (f"per-epoch test curve on a {curve_n}-image stratified sample of the test split (figure only)"
            if curves == "test" else "per-epoch validation curve")
    return (f"{what}{val}; {length}, batch {cfg.batch_size}, {sched}, weight decay {cfg.weight_decay:g}, "
            f"momentum {cfg.momentum}, augment {cfg.augment}; {held}; final test error on {test_n} test images")


def summarize(family: str, name: str, depth: int, params: int, result: Any, run_id: str) -> dict[str, Any]:
    last = result.history[-1]
    return {"family": family, "model": name, "depth": depth, "params": params, "iterations": int(last["step"]),
            "train_error": 1.0 - last["train_acc"], "test_error": 1.0 - result.test.accuracy,
            "train_seconds": result.train_seconds, "run_id": run_id, "note": ""}


def degradation_table(rows: list[dict[str, Any]]) -> str:
    from .tables import markdown_table

    def pct(v: float) -> str:
        return f"{v:.2%}" if v == v else "n/a"

    body = [[("plain" if r["family"] == "plain" else "ResNet"), r["depth"],
             f"{r['params'] / 1e6:.2f}M" if r["params"] else "n/a", r["iterations"] or "n/a",
             pct(r["train_error"]), pct(r["test_error"]),
             f"{r['train_seconds']:.0f}" if r["train_seconds"] else r["note"]] for r in rows]
    return markdown_table(["network", "depth", "params", "iterations", "final train error", "test error", "train time (s)"], body)


def observations(rows: list[dict[str, Any]]) -> list[str]:
    """What the numbers show about the paper's claims at this budget (stated, never assumed)."""
    by = {(r["family"], r["depth"]): r for r in rows if r["train_error"] == r["train_error"]}
    depths = sorted({d for _, d in by})
    notes = []
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        for family, label in (("plain", "plain"), ("residual", "ResNet")):
            if (family, lo) in by and (family, hi) in by:
                a, b = by[(family, lo)], by[(family, hi)]
                rel = "higher" if b["train_error"] > a["train_error"] else "lower"
                notes.append(f"{label}-{hi} ends with {rel} training error than {label}-{lo} "
                             f"({b['train_error']:.2%} vs {a['train_error']:.2%}; test {b['test_error']:.2%} vs {a['test_error']:.2%})")
        p_lo, p_hi = by.get(("plain", lo)), by.get(("plain", hi))
        if p_lo and p_hi:
            degraded = p_hi["train_error"] > p_lo["train_error"]
            notes.append("degradation " + ("appeared" if degraded else "did NOT appear")
                         + f" at this budget: the deeper plain network {'trains worse' if degraded else 'does not train worse'} than the shallower one")
    for d in depths:
        if ("plain", d) in by and ("residual", d) in by:
            p, r = by[("plain", d)], by[("residual", d)]
            rel = "lower" if r["train_error"] < p["train_error"] else "not lower"
            notes.append(f"at depth {d} the ResNet's training error is {rel} than the plain net's "
                         f"({r['train_error']:.2%} vs {p['train_error']:.2%})")
    return notes


def plot_degradation(series: dict[str, dict[str, Any]], path: Path, heldout: str, title: str) -> Path:
    """Figure 6 of the paper: plain nets left, ResNets right; training error dashed, held-out error solid."""
    from .report import pyplot

    plt = pyplot()
    from matplotlib.lines import Line2D

    depths = sorted({s["depth"] for s in series.values()})
    colors = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(depths)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    top = 0.0
    for ax, family, label in ((axes[0], "plain", "plain"), (axes[1], "residual", "ResNet")):
        for s in (s for s in series.values() if s["family"] == family):
            marker = "o" if len(s["steps"]) < 30 else None
            c = colors[s["depth"]]
            ax.plot(s["steps"], np.multiply(s["train_error"], 100), "--", color=c, marker=marker, ms=3)
            ax.plot(s["steps"], np.multiply(s["heldout_error"], 100), "-", color=c, marker=marker, ms=3,
                    label=f"{label}-{s['depth']}")
            top = max(top, *s["train_error"], *s["heldout_error"])
        ax.set_title(f"{label} networks")
        ax.set_xlabel("iterations")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        style = [Line2D([], [], color="k", ls="--", label="training error"), Line2D([], [], color="k", ls="-", label=heldout)]
        ax.legend(handles=handles + style, fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100, top * 100 * 1.05 + 1))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
