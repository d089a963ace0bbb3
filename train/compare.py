"""``reslab compare``: finished runs side by side, every number read back from MLflow.

Accuracy, macro precision/recall/F1 and per-class F1 are the run's logged test metrics; training time
and images/s are its ``train_seconds`` / ``train_images_per_sec``; the confusion matrix is its
``test_report.json`` artifact. Parameters and FLOPs per image are computed from the architecture
name (``train.flops``). Each residual network is set against its "baseline CNN": the plain network of
the same depth, when one is among the selected runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .cli import fail

COMPARE_TAG = "reslab.compare"


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="compare finished runs: accuracy, macro P/R/F1, per-class F1, cost, confusion matrices",
        description="Read finished runs from MLflow and write a comparison report (Markdown + HTML + confusion "
        "matrices side by side), printed and logged as artifacts of a new 'compare' run. Select runs by "
        "experiment, tag and/or run id; runs without test metrics (e.g. parent runs) are skipped, and a parent "
        "run id given to --runs stands for its child runs.",
        epilog="examples:  reslab compare --experiment degradation-cifar10\n"
        "           reslab compare --tag mlflow.parentRunId=<parent run id>\n"
        "           reslab compare --runs <id> <id> --output report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("which runs (combine freely)")
    g.add_argument("--experiment", action="append", metavar="NAME", help="MLflow experiment name (repeatable)")
    g.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only runs with this tag (repeatable), e.g. family=residual")
    g.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs (a parent run stands for its children)")
    g.add_argument("--max-runs", type=int, default=50, help="at most this many runs, newest first (default: 50)")
    o = p.add_argument_group("report")
    o.add_argument("--into", default="compare", metavar="EXPERIMENT", help="experiment of the new compare run (default: compare)")
    o.add_argument("--run-name", help="name of the compare run")
    o.add_argument("--output", metavar="DIR", help="also write compare.md, compare.html, compare.json and confusion_matrices.png here")
    p.set_defaults(func=cmd_compare)


# --------------------------------------------------------------------------- selection


def parse_tags(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _has_test_metrics(run: Any) -> bool:
    """A trained run with its test evaluation: not a comparison's own run, nor a `reslab evaluate --log` run
    (a measurement of some model, with no training of its own to compare, logged into the dataset's experiment)."""
    tags = run.data.tags
    return "test_acc" in run.data.metrics and tags.get(COMPARE_TAG) is None and tags.get("evaluated_model") is None


def select_runs(client: Any, experiments: list[str] | None, tags: dict[str, str], run_ids: list[str] | None,
                max_runs: int = 50) -> list[Any]:
    """The finished runs with test metrics that match every given criterion, oldest first."""
    from mlflow.exceptions import MlflowException

    tag_filter = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    if experiments:
        exp_ids = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"no MLflow experiment named {name!r} in {client.tracking_uri}")
            exp_ids.append(exp.experiment_id)
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except MlflowException as e:
                raise ValueError(f"no run {rid!r} in {client.tracking_uri}") from e
            if _has_test_metrics(run):
                runs.append(run)
                continue
            children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
            if not children:
                raise ValueError(f"run {rid} has no test metrics and no child runs (was the test split evaluated?)")
            runs += children
        runs = [r for r in runs if r.info.status == "FINISHED" and _has_test_metrics(r)
                and (not experiments or r.info.experiment_id in exp_ids)
                and all(r.data.tags.get(k) == v for k, v in tags.items())]
    else:
        query = "attributes.status = 'FINISHED' and metrics.test_acc >= 0" + (f" and {tag_filter}" if tag_filter else "")
        runs = [r for r in client.search_runs(exp_ids, query, max_results=max_runs, order_by=["attributes.start_time DESC"])
                if _has_test_metrics(r)]
    unique = {r.info.run_id: r for r in runs}
    runs = sorted(unique.values(), key=lambda r: r.info.start_time)[-max_runs:]
    if not runs:
        raise ValueError("no finished runs with test metrics match the selection")
    return runs


# --------------------------------------------------------------------------- one row per run


def kind_of(arch: str) -> str:
    """Which family an architecture belongs to, in the words of the papers."""
    from .models import CIFAR_DEPTHS, IMAGENET_LAYERS

    m = re.fullmatch(r"(plain|resnet)(\d+)(v2)?", arch)
    if not m:
        return "ResNet-9 (wide, shallow)" if arch == "resnet9" else "other"
    family, depth, v2 = m.group(1), int(m.group(2)), bool(m.group(3))
    if family == "plain":
        return "baseline CNN (plain)"
    if depth in IMAGENET_LAYERS:
        return "ImageNet-style ResNet, pre-activation" if v2 else "ImageNet-style ResNet"
    if depth in CIFAR_DEPTHS:
        return "pre-activation ResNet" if v2 else "ResNet (CIFAR)"
    return "other"


def depth_of(arch: str) -> int | None:
    m = re.fullmatch(r"(?:plain|resnet)(\d+)(?:v2)?", arch)
    return int(m.group(1)) if m else None


def label(row: dict[str, Any]) -> str:
    return row["run_name"] if row["run_name"] == row["model"] else f"{row['run_name']} ({row['model']})"


def run_row(client: Any, run: Any, workdir: Path) -> dict[str, Any]:
    """Everything the report shows about one run, from its MLflow record (plus the computed cost)."""
    import mlflow

    from .data import DATASETS

    from .flops import model_cost

    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    arch = tags.get("model") or params.get("model", "?")
    dataset = tags.get("dataset") or params.get("dataset", "?")
    model_args = {k.split(".", 1)[1]: yaml.safe_load(v) for k, v in params.items() if k.startswith("model_args.")}
    report = None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_report.json",
                                                   dst_path=str(workdir / run.info.run_id))
        report = json.loads(Path(path).read_text())
    except Exception as e:  # a run logged by other tools may lack it; the table still has the metrics
        print(f"reslab: warning: run {run.info.run_id} has no readable test_report.json ({type(e).__name__})")
    info = DATASETS.get(dataset)
    classes = list(report["per_class"]) if report else (list(info.classes) if info else [])
    n_params = flops = None
    if info is not None:
        try:
            n_params, flops = model_cost(arch, len(classes) or len(info.classes), info.channels, info.image_size, model_args)
        except (ValueError, TypeError) as e:
            print(f"reslab: warning: cannot rebuild {arch} for run {run.info.run_id} ({e})")
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or run.info.run_id[:8],
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "model": arch,
        "model_args": model_args,
        "kind": kind_of(arch),
        "depth": depth_of(arch),
        "dataset": dataset,
        "params": n_params,
        "flops_per_image": flops,
        "train_seconds": metrics.get("train_seconds"),
        "train_images_per_sec": metrics.get("train_images_per_sec"),
        "test_acc": metrics.get("test_acc"),
        "test_precision_macro": metrics.get("test_precision_macro"),
        "test_recall_macro": metrics.get("test_recall_macro"),
        "test_f1_macro": metrics.get("test_f1_macro"),
        "classes": classes,
        "f1_per_class": {c: metrics.get(f"test_f1_{c}") for c in classes},
        "confusion_matrix": report["confusion_matrix"] if report else None,
    }


def attach_baselines(rows: list[dict[str, Any]]) -> None:
    """Point each residual row at the plain network of the same depth and dataset (same parent run first)."""
    for r in rows:
        r["baseline_run_id"], r["acc_vs_baseline"] = None, None
        if r["kind"] == "baseline CNN (plain)" or r["depth"] is None:
            continue
        plains = [p for p in rows if p["kind"] == "baseline CNN (plain)" and p["depth"] == r["depth"] and p["dataset"] == r["dataset"]]
        plains.sort(key=lambda p: p["parent_run_id"] != r["parent_run_id"] or r["parent_run_id"] is None)
        if plains and r["test_acc"] is not None and plains[0]["test_acc"] is not None:
            r["baseline_run_id"] = plains[0]["run_id"]
            r["acc_vs_baseline"] = r["test_acc"] - plains[0]["test_acc"]


# --------------------------------------------------------------------------- the report


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


MAIN_HEADERS = ["run", "model", "kind", "dataset", "params", "MFLOPs/image", "train time (s)", "images/s",
                "accuracy", "precision (macro)", "recall (macro)", "F1 (macro)", "accuracy vs baseline CNN"]


def main_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    names = {r["run_id"]: r["run_name"] for r in rows}
    out = []
    for r in rows:
        if r["kind"] == "baseline CNN (plain)":
            vs = "(baseline)"
        elif r["baseline_run_id"]:
            vs = f"{r['acc_vs_baseline'] * 100:+.2f} pp vs {names[r['baseline_run_id']]}"
        else:
            vs = "no plain net of this depth"
        out.append([f"{r['run_name']} ({r['run_id'][:8]})", r["model"], r["kind"], r["dataset"],
                    "n/a" if r["params"] is None else f"{r['params']:,}", _num(r["flops_per_image"] and r["flops_per_image"] / 1e6, ".1f"),
                    _num(r["train_seconds"], ".1f"), _num(r["train_images_per_sec"], ".1f"), _num(r["test_acc"], ".4f"),
                    _num(r["test_precision_macro"], ".4f"), _num(r["test_recall_macro"], ".4f"), _num(r["test_f1_macro"], ".4f"), vs])
    return out


def per_class_tables(rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(dataset, headers, cells): one per-class F1 table per dataset (their classes differ)."""
    tables = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == ds]
        classes = list(dict.fromkeys(c for r in group for c in r["classes"]))
        cells = [[label(r)] + [_num(r["f1_per_class"].get(c), ".4f") for c in classes] for r in group]
        tables.append((ds, ["run"] + classes, cells))
    return tables


def confusion_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """All the runs' confusion matrices in one figure, so they can be read side by side."""
    from .report import plot_confusions

    shown = [r for r in rows if r["confusion_matrix"] is not None]
    return plot_confusions([(r["confusion_matrix"], r["classes"], label(r)) for r in shown], path) if shown else None


NOTES = [
    "Every number except params and FLOPs is read from the run's MLflow record (test metrics, train_seconds, "
    "train_images_per_sec, test_report.json).",
    "params and FLOPs are computed from the architecture name at the dataset's input size; FLOPs are "
    "torch.utils.flop_counter.FlopCounterMode's count for one forward pass (a multiply-add counts 2; "
    "convolutions and linear layers only).",
    "The baseline CNN of a ResNet is the plain network of the same depth (same layers without shortcuts).",
]


def build_report(rows: list[dict[str, Any]], selection: str, figure: Path | None) -> tuple[str, str]:
    """(markdown, html) of the same tables."""
    from .tables import html_page, html_table, markdown_table

    title = f"Comparison of {len(rows)} runs"
    main = main_cells(rows)
    md = [f"# {title}", "", f"Selected by: {selection}", "", markdown_table(MAIN_HEADERS, main), ""]
    body = [f"<h1>{title}</h1>", f"<p>Selected by: {selection}</p>", html_table(MAIN_HEADERS, main)]
    for ds, headers, cells in per_class_tables(rows):
        md += [f"## Per-class F1 ({ds})", "", markdown_table(headers, cells), ""]
        body += [f"<h2>Per-class F1 ({ds})</h2>", html_table(headers, cells)]
    if figure is not None:
        md += ["## Confusion matrices", "", f"![confusion matrices]({figure.name})", ""]
        b64 = base64.b64encode(figure.read_bytes()).decode()
        body += ["<h2>Confusion matrices</h2>", f"<img alt='confusion matrices' src='data:image/png;base64,{b64}'>"]
    md += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    body += ["<h2>Notes</h2><ul>"] + [f"<li>{n}</li>" for n in NOTES] + ["</ul>"]
    return "\n".join(md), html_page(title, "\n".join(body))


def compare(experiments: list[str] | None = None, tags: dict[str, str] | None = None, run_ids: list[str] | None = None,
            into: str = "compare", run_name: str | None = None, output: str | None = None, max_runs: int = 50) -> dict[str, Any]:
    """Select runs, build the report, log it as a new compare run; returns the rows and the run id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from .tracking import experiment_id, setup_tracking

    setup_tracking()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run is noise
    client = MlflowClient()
    tags = tags or {}
    runs = select_runs(client, experiments, tags, run_ids, max_runs)
    parts = ([f"experiment {', '.join(experiments)}"] if experiments else []) + [f"tag {k}={v}" for k, v in tags.items()]
    parts += [f"runs {' '.join(run_ids)}"] if run_ids else []
    selection = "; ".join(parts) or "all experiments"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [run_row(client, r, work / "downloads") for r in runs]
        attach_baselines(rows)
        out = Path(output) if output else work / "report"
        out.mkdir(parents=True, exist_ok=True)
        figure = confusion_figure(rows, out / "confusion_matrices.png")
        md, page = build_report(rows, selection, figure)
        (out / "compare.md").write_text(md)
        (out / "compare.html").write_text(page)
        (out / "compare.json").write_text(json.dumps({"selection": selection, "runs": rows}, indent=1))
        with mlflow.start_run(experiment_id=experiment_id(into), run_name=run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                              tags={COMPARE_TAG: "1", "compared_runs": ",".join(r["run_id"] for r in rows)}) as run:
            mlflow.log_params({"selection": selection[:6000], "runs": len(rows)})
            mlflow.log_artifacts(str(out))
    return {"run_id": run.info.run_id, "rows": rows, "markdown": md}


def cmd_compare(args: argparse.Namespace) -> None:
    if not (args.experiment or args.tag or args.runs):
        fail("say which runs to compare: --experiment NAME, --tag KEY=VALUE and/or --runs ID...")
    res = compare(args.experiment, parse_tags(args.tag), args.runs, args.into, args.run_name, args.output, args.max_runs)
    print(res["markdown"])
    print(f"report logged to compare run {res['run_id']} (experiment {args.into!r})"
          + (f" and written to {args.output}" if args.output else ""))
