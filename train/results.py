"""Measured results as data files, and the performance page's tables generated from them.

``docs/results/`` holds one JSON file per measured run: a training run (exported from its MLflow run by
``reslab results export``, schema below) or a benchmark (the JSON ``reslab bench --out`` writes, as is).
``reslab results docs`` rewrites every table of ``docs/performance.md`` that sits between marker comments
such as ``<!-- results:bench dataset=cifar10 compile=true -->`` and ``<!-- /results:bench -->`` from the
files that match the marker's ``key=value`` filters; the prose around them is left as written. So a number
on the page can always be traced to a file, and a file to its MLflow run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .data import project_root
from .errors import DataError
from .files import write_text_atomic
from .tables import markdown_table

SCHEMA = 1
# a training result: every key is present (null where unknown); "goal" and "note" are optional, written by hand
TRAIN_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (int,), "kind": (str,), "source": (str,), "dataset": (str,), "command": (str,), "recipe": (str,),
    "model": (str,), "model_args": (dict,), "epochs": (int,), "time_budget_seconds": (int, float),
    "wall_seconds": (int, float),
    "wall_seconds_of": (str,), "train_images_per_sec": (int, float), "test_acc": (int, float),
    "test_f1_macro": (int, float), "curve": (list,), "machine": (dict,), "date_utc": (str,), "git_commit": (str,),
    "mlflow": (dict,),
}
# "test_acc_parts": accuracy on each named part of the test split (FER-2013: privatetest, publictest), from the run
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"goal": (dict,), "note": (str,), "test_acc_parts": (dict,)}
MACHINE_FIELDS: dict[str, tuple[type, ...]] = {"cpu_model": (str,), "avx512_bf16": (bool,), "cores": (int,)}
BENCH_FIELDS = ("dataset", "model", "batch_size", "compile", "pipelines", "ratios", "when")
WALL_OF_RUN = "the MLflow run, start to end: training, evaluation, logging (not start-up and data loading)"


# --------------------------------------------------------------------------- reading and checking files


def kind_of(result: dict[str, Any]) -> str:
    """``train`` for a training result, ``bench`` for what ``reslab bench --out`` writes."""
    if result.get("kind") == "train":
        return "train"
    if "pipelines" in result and "ratios" in result:
        return "bench"
    raise ValueError("neither a training result (\"kind\": \"train\") nor a `reslab bench --out` file")


def _check_types(obj: dict[str, Any], fields: dict[str, tuple[type, ...]], where: str) -> None:
    for key, types in fields.items():
        value = obj[key]
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            expected = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{where}{key} is {type(value).__name__}, expected {expected} or null")


def check_train(r: dict[str, Any]) -> None:
    """Every field of the schema present, each of its type or null, nothing unknown (a typo would pass silently)."""
    missing = [k for k in TRAIN_FIELDS if k not in r]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (use null where a value is unknown)")
    unknown = sorted(set(r) - set(TRAIN_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    _check_types(r, TRAIN_FIELDS, "")
    _check_types({k: r.get(k) for k in OPTIONAL_FIELDS}, OPTIONAL_FIELDS, "")
    if r["schema"] != SCHEMA:
        raise ValueError(f"schema {r['schema']}, this reslab reads schema {SCHEMA}")
    if r["machine"] is not None:
        missing = [k for k in MACHINE_FIELDS if k not in r["machine"]]
        if missing:
            raise ValueError(f"machine lacks {', '.join(missing)}")
        _check_types(r["machine"], MACHINE_FIELDS, "machine.")
    for point in r["curve"] or []:
        if not (isinstance(point, list) and len(point) == 2 and all(isinstance(x, int | float) for x in point)):
            raise ValueError(f"curve point {point!r} is not [minutes, val_acc]")
    goal = r.get("goal")
    if goal is not None and not all(isinstance(goal.get(k), int | float) for k in ("test_acc", "minutes")):
        raise ValueError("goal needs test_acc and minutes (and optionally a label)")


def check_bench(r: dict[str, Any]) -> None:
    """The fields of a ``reslab bench --out`` file the tables read."""
    missing = [k for k in BENCH_FIELDS if k not in r]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} of a `reslab bench --out` file")
    for name, p in r["pipelines"].items():
        if not isinstance(p, dict) or not isinstance(p.get("images_per_sec"), int | float):
            raise ValueError(f"pipelines.{name}.images_per_sec is not a number")


def load_result(path: Path) -> dict[str, Any]:
    """One result file, checked; any problem is a one-line :class:`DataError` naming the file."""
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such result file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    try:
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
        (check_train if kind_of(result) == "train" else check_bench)(result)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return result


def load_results(folder: Path) -> dict[Path, dict[str, Any]]:
    """Every ``*.json`` in ``folder``, by path, in name order."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such results folder")
    return {p: load_result(p) for p in sorted(folder.glob("*.json"))}


# --------------------------------------------------------------------------- tables


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _minutes(seconds: float) -> str:
    """Minutes to one decimal, halves rounded up (1,695 s: 28.3 min, as people round)."""
    return f"{int(seconds / 6 + 0.5) / 10:.1f}"


def _percent(x: float) -> str:
    return f"{x * 100:.2f}%"


def goal_cell(r: dict[str, Any]) -> str:
    """``≥ 91.25% in ≤ 15 min: met``, or how far it was missed; computed, never typed."""
    goal = r.get("goal")
    if not goal:
        return "—"
    label = f"{goal['label']} " if goal.get("label") else ""
    text = f"{label}≥ {goal['test_acc'] * 100:g}% in ≤ {goal['minutes']:g} min"
    acc, wall = r["test_acc"], r["wall_seconds"]
    if acc is None or wall is None:
        return f"{text}: not measured"
    short = []
    if acc < goal["test_acc"]:
        short.append(f"{(goal['test_acc'] - acc) * 100:.2f} points short")
    if wall > goal["minutes"] * 60:
        short.append(f"{_minutes(wall - goal['minutes'] * 60)} min over")
    return f"{text}: " + (f"not reached ({', '.join(short)})" if short else "met")


TRAIN_HEADERS = ["dataset", "command", "epochs", "wall time", "train images/s", "test accuracy", "macro F1", "goal",
                 "MLflow run", "notes"]


def train_row(r: dict[str, Any]) -> list[str]:
    wall = r["wall_seconds"]
    run = (r["mlflow"] or {}).get("run_name") or "—"
    return [r["dataset"], f"`{r['command']}`" if r["command"] else "—", _num(r["epochs"], "d"),
            "—" if wall is None else f"{_minutes(wall)} min ({wall:,.0f} s)", _num(r["train_images_per_sec"], ",.0f"),
            "—" if r["test_acc"] is None else _percent(r["test_acc"]), _num(r["test_f1_macro"], ".3f"), goal_cell(r),
            f"`{run}`" if run != "—" else run, r.get("note") or ""]


BENCH_HEADERS = ["run (UTC)", "machine", "model, batch", "ceiling img/s", "reslab img/s", "conventional img/s", "reslab / ceiling",
                 "reslab / conventional"]


def bench_row(r: dict[str, Any]) -> list[str]:
    p, q = r["pipelines"], r["ratios"]
    speed = [_num(p.get(name, {}).get("images_per_sec"), ",.0f") for name in ("ceiling", "reslab", "conventional")]
    ratios = [_num(q.get(k), ".2f") for k in ("reslab_over_ceiling", "reslab_over_conventional")]
    model = f"{r['model']}, {r['batch_size']}" + (", compiled" if r["compile"] else "")
    return [str(r["when"])[:16], machine_label(r.get("machine") or {}), model, *speed, *ratios]


def machine_label(machine: dict[str, Any]) -> str:
    """``Intel Xeon, AMX``, ``AMD EPYC, no bf16`` (the CPU) or ``NVIDIA H200`` (the GPU) from a benchmark's
    machine record: speeds compare only within one kind of machine, and one CPU name comes with or without
    bf16 (an AMD EPYC of this pool has AVX-512 BF16 or AVX2 only)."""
    if machine.get("gpu"):
        return str(machine["gpu"])
    name = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b.*|\d+-Core", "", str(machine.get("cpu") or "—"))
    name = " ".join(name.split()) or "—"
    return name + (", AMX" if machine.get("cpu_amx") else "") + (", no bf16" if machine.get("cpu_bf16") is False else "")


TABLES: dict[str, tuple[list[str], Callable[[dict[str, Any]], list[str]], Callable[[dict[str, Any]], str]]] = {
    # kind: headers, one row per file, sort key
    "train": (TRAIN_HEADERS, train_row, lambda r: f"{r['dataset']} {r['date_utc'] or ''}"),
    "bench": (BENCH_HEADERS, bench_row, lambda r: str(r["when"])),
}
# a marker is a line of its own (the same text inside a sentence or a code span is prose)
MARKER = re.compile(r"^<!-- results:(?P<kind>\w+)(?P<filters>[^>\n]*?) -->\n(?P<body>.*?)^<!-- /results:(?P=kind) -->$",
                    re.DOTALL | re.MULTILINE)
OPENING = re.compile(r"^<!-- results:\w+[^>\n]*?-->$", re.MULTILINE)


def parse_filters(text: str, where: str) -> dict[str, Any]:
    """``dataset=cifar10 compile=true`` -> {"dataset": "cifar10", "compile": True} (values read as JSON if they can be)."""
    out: dict[str, Any] = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"{where}: filter {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def render_table(kind: str, filters: dict[str, Any], results: dict[Path, dict[str, Any]], where: str) -> str:
    """The Markdown table of the results of ``kind`` whose fields equal every filter."""
    headers, row, key = TABLES[kind]
    chosen = [(p, r) for p, r in results.items() if kind_of(r) == kind and all(r.get(k) == v for k, v in filters.items())]
    if not chosen:
        spec = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in filters.items())
        raise DataError(f"{where}: no result file matches <!-- results:{kind} {spec} -->")
    chosen.sort(key=lambda pr: (key(pr[1]), pr[0].name))
    return markdown_table(headers, [row(r) for _, r in chosen])


def regenerate(page: str, results: dict[Path, dict[str, Any]], where: str) -> tuple[str, int]:
    """``page`` with every marked table rebuilt from ``results``; returns (new text, number of tables)."""
    opened = {m.start() for m in OPENING.finditer(page)}
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        kind = m["kind"]
        if kind not in TABLES:
            raise DataError(f"{where}: unknown table kind results:{kind} (known: {', '.join(TABLES)})")
        opened.discard(m.start())
        count += 1
        table = render_table(kind, parse_filters(m["filters"], where), results, where)
        return f"<!-- results:{kind}{m['filters']} -->\n{table}\n<!-- /results:{kind} -->"

    text = MARKER.sub(replace, page)
    if opened:
        line = page.count("\n", 0, min(opened)) + 1
        raise DataError(f"{where}:{line}: a <!-- results:... --> marker without its closing <!-- /results:... -->")
    return text, count


def write_docs(page: Path, folder: Path, check: bool = False) -> tuple[bool, int, int]:
    """Regenerate ``page`` from the files in ``folder`` (only if it changes; ``check``: never write).
    Returns (changed, tables, files)."""
    if not page.is_file():
        raise DataError(f"{page}: no such page")
    results = load_results(folder)
    old = page.read_text()
    new, tables = regenerate(old, results, str(page))
    if new != old and not check:
        write_text_atomic(page, new)
    return new != old, tables, len(results)


# --------------------------------------------------------------------------- export from MLflow


def find_run(client: Any, run_id: str | None, run_name: str | None, experiment: str | None) -> Any:
    """The run by id, or the one run with this name (in ``experiment``, else in any experiment)."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise DataError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise DataError(f"no MLflow experiment named {experiment!r}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs(exp_ids, f"attributes.run_name = '{quoted}'", max_results=10)
    where = f" in experiment {experiment!r}" if experiment else ""
    if not runs:
        raise DataError(f"no MLflow run named {run_name!r}{where}")
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs)
        raise DataError(f"{len(runs)} runs named {run_name!r}{where} ({ids}); give the run id")
    return runs[0]


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    """A per-epoch metric by step (epoch); the last value where an epoch was logged twice (a resumed run)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def _value(text: str) -> Any:
    """A param as logged (a string) back to its value where it reads as JSON: "32" -> 32, "B" -> "B"."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def result_from_run(client: Any, run: Any, note: str | None = None) -> dict[str, Any]:
    """A training result (schema above) from a finished ``reslab train`` run, through MLflow's public client."""
    info, params, metrics, tags = run.info, run.data.params, run.data.metrics, run.data.tags
    if info.status != "FINISHED":
        raise DataError(f"run {info.run_id} is {info.status}; only finished runs have final numbers")
    wall, val = _history(client, info.run_id, "wall_seconds"), _history(client, info.run_id, "val_acc")
    curve = [[wall[e] / 60, val[e]] for e in sorted(wall) if e in val]
    machine = None
    if "cpu_model" in tags:
        cores = tags.get("cpu_cores")
        machine = {"cpu_model": tags["cpu_model"],
                   "avx512_bf16": {"yes": True, "no": False}.get(tags.get("cpu_avx512_bf16", "")),
                   "cores": int(cores) if cores and cores.isdigit() else None}
    budget = _number(params.get("time_budget"))
    result: dict[str, Any] = {
        "schema": SCHEMA, "kind": "train",
        "source": "exported from its MLflow run by `reslab results export`",
        "dataset": params.get("dataset") or tags.get("dataset"),
        "command": tags.get("command"),
        "recipe": tags.get("recipe"),
        "model": params.get("model") or tags.get("model"),
        "model_args": {k.removeprefix("model_args."): _value(v) for k, v in params.items() if k.startswith("model_args.")},
        "epochs": len(wall) or None,  # epochs that ran (with early stopping, fewer than the params say)
        "time_budget_seconds": budget,
        "wall_seconds": (info.end_time - info.start_time) / 1000 if info.end_time else None,
        "wall_seconds_of": WALL_OF_RUN,
        "train_images_per_sec": metrics.get("train_images_per_sec"),
        "test_acc": metrics.get("test_acc"),
        "test_f1_macro": metrics.get("test_f1_macro"),
        "curve": curve or None,
        "machine": machine,
        "date_utc": datetime.fromtimestamp(info.start_time / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": tags.get("git_commit") if tags.get("git_commit") not in (None, "unknown") else None,
        "mlflow": {"experiment": client.get_experiment(info.experiment_id).name, "run_name": info.run_name,
                   "run_id": info.run_id},
    }
    parts = {k.removeprefix("test_acc_"): v for k, v in sorted(metrics.items()) if k.startswith("test_acc_")}
    if parts:
        result["test_acc_parts"] = parts
    if note:
        result["note"] = note
    check_train(result)
    return result


def dump(result: dict[str, Any]) -> str:
    """A result file's text: indented JSON, one line per curve point, non-ASCII kept (en dashes in notes)."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s+([-\d.eE+]+),\s+([-\d.eE+]+)\s+\]", r"[\1, \2]", text) + "\n"


def export_run(out: Path, run_id: str | None = None, run_name: str | None = None, experiment: str | None = None,
           note: str | None = None) -> dict[str, Any]:
    """Write the result file of one MLflow run to ``out``."""
    from mlflow.tracking import MlflowClient

    from .tracking import setup_tracking

    setup_tracking()
    client = MlflowClient()
    result = result_from_run(client, find_run(client, run_id, run_name, experiment), note)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, dump(result))
    return result


# --------------------------------------------------------------------------- reslab results


def add_results_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="result files in docs/results/ and the performance page made from them",
                       description="Turn finished training runs into result files (export) and rebuild the tables of "
                       "docs/performance.md from docs/results/ (docs). Benchmarks: "
                       "`reslab bench --out docs/results/NAME.json`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser("export", help="write the result file of a finished `reslab train` run",
                           description="Read a finished run's params, metrics, per-epoch history and tags through MLflow "
                           "($MLFLOW_TRACKING_URI or ./mlruns) and write it as a result file.")
    e.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the MLflow run id")
    e.add_argument("--run-name", metavar="NAME", help="the run's name instead of its id (must be unique)")
    e.add_argument("--experiment", metavar="NAME", help="look for --run-name in this experiment only")
    e.add_argument("--note", metavar="TEXT", help="a remark for the table's notes column (e.g. 'machine otherwise idle')")
    e.add_argument("--out", metavar="FILE.json", required=True, help="e.g. docs/results/cifar10-fast-cpu.json")
    e.set_defaults(func=cmd_export)
    d = actions.add_parser("docs", help="rebuild the marked tables of docs/performance.md from docs/results/",
                           description="Rewrite every table between <!-- results:KIND key=value ... --> and "
                           "<!-- /results:KIND --> from the result files whose fields match; the rest of the page is kept.")
    d.add_argument("--results", metavar="DIR", type=Path, default=project_root() / "docs" / "results",
                   help="folder of result files (default: docs/results)")
    d.add_argument("--page", metavar="FILE.md", type=Path, default=project_root() / "docs" / "performance.md",
                   help="the page to rewrite (default: docs/performance.md)")
    d.add_argument("--check", action="store_true", help="change nothing; exit 1 if the page is out of date")
    d.set_defaults(func=cmd_docs)


def cmd_export(args: argparse.Namespace) -> None:
    if bool(args.run_id) == bool(args.run_name):
        raise DataError("give a RUN_ID or --run-name NAME (one of them)")
    r = export_run(Path(args.out), args.run_id, args.run_name, args.experiment, args.note)
    acc = "no test accuracy" if r["test_acc"] is None else f"test accuracy {_percent(r['test_acc'])}"
    print(f"wrote {args.out}: run {r['mlflow']['run_name']} ({r['mlflow']['run_id']}), {r['dataset']}, {acc}")


def cmd_docs(args: argparse.Namespace) -> None:
    changed, tables, files = write_docs(args.page, args.results, args.check)
    if args.check and changed:
        print(f"{args.page} is out of date with {args.results}; run `reslab results docs`", file=sys.stderr)
        raise SystemExit(1)
    what = f"{tables} tables from {files} result files"
    print(f"rewrote {args.page}: {what}" if changed and not args.check else f"{args.page} is up to date ({what})")
