"""Result files and the performance page made from them (issue 17): a real run exported from MLflow holds
that run's numbers, the page's tables follow the files, and a bad file is one line naming it."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from train import machine
from train.cli import main
from train.results import MARKER, load_result, write_docs

ROOT = Path(__file__).resolve().parents[1]


def reslab(capsys, *args: str) -> tuple[int, str, str]:
    """``reslab ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_of_a_real_run_holds_the_runs_numbers(mlflow_store, data_dir, tmp_path, capsys):
    tiny = str(Path(__file__).with_name("tiny-resnet9.yaml"))  # what is checked is the copy, not the network: its test
    # evaluation takes ~2.5 s on one AVX2 thread, the default ResNet-20's ~46 s
    train = ["train", "--no-progress", "--data", str(data_dir), "--subset", "300", "--epochs", "2", "--batch-size", "64",
             "--run-name", "tiny-export", "--config", tiny]
    assert reslab(capsys, *train)[0] == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    tags, metrics = run.data.tags, run.data.metrics
    # the machine, recorded by every run (train/machine.py), and how it was started
    assert tags["cpu_model"] == machine.cpu_model() and tags["cpu_model"]
    assert tags["cpu_avx512_bf16"] == ("yes" if machine.cpu_has_flag("avx512_bf16") else "no")
    assert tags["cpu_cores"] == str(os.cpu_count()) and tags["torch_threads"] == str(torch.get_num_threads())
    assert tags["command"] == "reslab " + " ".join(train) and "recipe" not in tags

    out = tmp_path / "results" / "tiny.json"
    code, stdout, _ = reslab(capsys, "results", "export", run.info.run_id, "--out", str(out))
    assert code == 0 and f"wrote {out}" in stdout
    r = load_result(out)  # a valid file of the schema
    wall = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "wall_seconds")}
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
    assert sorted(wall) == sorted(val) == [1, 2]
    assert r["curve"] == [[wall[1] / 60, val[1]], [wall[2] / 60, val[2]]]
    assert r["curve"][1][0] > r["curve"][0][0] > 0
    assert (r["test_acc"], r["test_f1_macro"], r["train_images_per_sec"]) == (
        metrics["test_acc"], metrics["test_f1_macro"], metrics["train_images_per_sec"])
    assert r["epochs"] == 2 and r["dataset"] == "cifar10" and r["model"] == "resnet9" and r["model_args"] == {"width": 8}
    assert "test_acc_parts" not in r  # CIFAR-10's test split has no named parts (FER-2013's: tests/test_ensemble.py)
    assert r["time_budget_seconds"] is None and r["recipe"] is None and r["command"] == tags["command"]
    assert r["wall_seconds"] == (run.info.end_time - run.info.start_time) / 1000 >= wall[2]
    assert r["date_utc"] == datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert r["machine"] == {"cpu_model": machine.cpu_model(), "avx512_bf16": machine.cpu_has_flag("avx512_bf16"),
                            "cores": os.cpu_count()}
    assert r["git_commit"] == (tags["git_commit"] if tags["git_commit"] != "unknown" else None)
    assert r["mlflow"] == {"experiment": "cifar10", "run_name": "tiny-export", "run_id": run.info.run_id}

    # by name, the same file; an unknown name is one line
    by_name = tmp_path / "by-name.json"
    by_name_args = ["--run-name", "tiny-export", "--experiment", "cifar10", "--out", str(by_name)]
    assert reslab(capsys, "results", "export", *by_name_args)[0] == 0
    assert by_name.read_text() == out.read_text()
    code, _, err = reslab(capsys, "results", "export", "--run-name", "nope", "--out", str(tmp_path / "x.json"))
    assert code == 2 and err.splitlines() == ["reslab: error: no MLflow run named 'nope'"]

    # and the page's table shows the run's numbers
    page = tmp_path / "page.md"
    page.write_text("Runs:\n\n<!-- results:train dataset=cifar10 -->\n<!-- /results:train -->\n")
    assert write_docs(page, out.parent)[:2] == (True, 1)
    (row,) = [line for line in page.read_text().splitlines() if line.startswith("| cifar10 ")]
    assert f"| {metrics['test_acc'] * 100:.2f}% | {metrics['test_f1_macro']:.3f} |" in row and "`tiny-export`" in row


@pytest.fixture
def docs_copy(tmp_path) -> tuple[Path, Path]:
    """docs/performance.md and docs/results/ copied into a temp folder: (page, results folder)."""
    page, results = tmp_path / "performance.md", tmp_path / "results"
    shutil.copy(ROOT / "docs" / "performance.md", page)
    shutil.copytree(ROOT / "docs" / "results", results)
    return page, results


def tables(text: str) -> list[str]:
    return [m["body"] for m in MARKER.finditer(text)]


def prose(text: str) -> str:
    return MARKER.sub("<table>", text)


def test_the_pages_tables_come_from_the_files(docs_copy):
    page, results = docs_copy
    committed = page.read_text()
    # the committed page is what its files give (a hand-edited table would show here)
    assert write_docs(page, results) == (False, 6, len(list(results.glob("*.json"))))
    assert len(tables(committed)) == 6
    # a value changed in a file -> the table row changes; a file removed -> its row goes; the prose stays
    bench = results / "bench-cifar10-compiled-2026-11-23T0116.json"
    b = json.loads(bench.read_text())
    assert b["pipelines"]["ceiling"]["images_per_sec"] == 1253
    b["pipelines"]["ceiling"]["images_per_sec"] = 1234.4
    b["machine"].update(cpu="Intel(R) Xeon(R) Processor", cpu_amx=True)  # a CPU of another kind: its row says so
    bench.write_text(json.dumps(b))
    trained = results / "train-cifar10-fast-cpu-14ep.json"
    t = json.loads(trained.read_text())
    t["test_acc"] = 0.9555
    trained.write_text(json.dumps(t))
    (results / "bench-cifar10-eager-2026-11-23T0104.json").unlink()
    slow = results / "bench-cifar10-eager-2026-11-23T0121.json"  # the same CPU name without bf16 (AVX2 only)
    e = json.loads(slow.read_text())
    e["machine"]["cpu_bf16"] = False
    slow.write_text(json.dumps(e))
    assert write_docs(page, results)[0] is True
    new = page.read_text()
    compiled, eager, fer, gpu, train, airbench = tables(new)
    assert "| 2026-11-23 01:16 | Intel Xeon, AMX | resnet20, 128, compiled | 1,234 | 1,182 | 451 | 0.99 | 2.60 |" in compiled
    assert "1,253" not in compiled and "| 2026-11-23 01:17 | AMD EPYC | resnet20, 128, compiled | 1,561 |" in compiled
    assert "2026-11-23 01:04" not in eager and eager.count("\n| 2026-11-23") == 3
    assert "| 2026-11-23 01:21 | AMD EPYC, no bf16 | resnet20, 128 |" in eager
    assert "| 2026-11-23 01:23 | AMD EPYC | resnet20, 128 |" in eager
    assert "| 95.55% | 0.926 |" in train and "92.63%" not in train
    assert fer == tables(committed)[2] and gpu == tables(committed)[3] and airbench == tables(committed)[5]
    assert "| NVIDIA H200 | airbench, 1024 | 153,590 | 137,422 | 5,701 | 0.91 | 21.08 |" in gpu and "2026-12-04 15:" not in compiled + eager  # the GPU runs only in theirs
    assert prose(new) == prose(committed)
    # a second run changes nothing
    assert write_docs(page, results)[0] is False and page.read_text() == new


@pytest.mark.parametrize("breakage, message", [
    ("not json", "not valid JSON (Expecting value at line 1, column 1)"),
    ("no test_acc", "missing field(s) test_acc (use null where a value is unknown)"),
    ("text accuracy", "test_acc is str, expected int or float or null"),
])
def test_a_bad_result_file_is_one_line_naming_it(docs_copy, capsys, breakage, message):
    page, results = docs_copy
    before = page.read_text()
    bad = results / "train-fer2013-fast-cpu-22ep.json"
    r = json.loads(bad.read_text())
    if breakage == "not json":
        bad.write_text("not json\n")
    elif breakage == "no test_acc":
        del r["test_acc"]
        bad.write_text(json.dumps(r))
    else:
        r["test_acc"] = "70.97%"
        bad.write_text(json.dumps(r))
    code, _, err = reslab(capsys, "results", "docs", "--results", str(results), "--page", str(page))
    assert code == 2 and err.splitlines() == [f"reslab: error: {bad}: {message}"]
    assert page.read_text() == before


def test_a_missing_folder_or_an_empty_selection_is_one_line(docs_copy, capsys):
    page, results = docs_copy
    code, _, err = reslab(capsys, "results", "docs", "--results", str(results.parent / "nowhere"), "--page", str(page))
    assert code == 2 and err.splitlines() == [f"reslab: error: {results.parent / 'nowhere'}: no such results folder"]
    page.write_text(page.read_text() + "\n<!-- results:bench dataset=mnist -->\n<!-- /results:bench -->\n")
    code, _, err = reslab(capsys, "results", "docs", "--results", str(results), "--page", str(page), "--check")
    assert code == 2
    assert err.splitlines() == [f"reslab: error: {page}: no result file matches <!-- results:bench dataset=mnist -->"]


def test_cpu_flags_are_whole_words(tmp_path, monkeypatch):
    """``avx512_bf16`` is not found inside a longer flag, and the model name is the field's value."""
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(machine, "CPUINFO", info)
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512_bf16x sse4_2\n")
    assert machine.cpu_model() == "Test CPU 9000"
    assert not machine.cpu_has_flag("avx512_bf16") and machine.cpu_has_flag("sse4_2")
    info.write_text("model name\t: Test CPU 9000\nflags\t\t: fpu avx512_bf16 sse4_2\n")
    assert machine.cpu_has_flag("avx512_bf16") and machine.machine_tags(3)["cpu_avx512_bf16"] == "yes"
    info.unlink()  # no /proc/cpuinfo (macOS): the platform's name, no flags
    assert machine.cpu_model() and not machine.cpu_has_flag("avx512_bf16")


def test_a_write_that_fails_leaves_the_old_page_whole(tmp_path):
    """docs/performance.md, result files and `bench --out` are replaced whole or not at all: a write that
    fails half way (here text that cannot be encoded, as a lone surrogate from a JSON "\\ud800" would be; a full
    disk, a Ctrl-C) used to leave the page empty, which the next `reslab results docs` could not regenerate."""
    from train.files import write_text_atomic

    page = tmp_path / "performance.md"
    page.write_text("the old page\n" * 100)
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(page, "the new page\n" * 100 + "\ud800")
    assert page.read_text() == "the old page\n" * 100 and list(tmp_path.iterdir()) == [page]  # no temp file left
    write_text_atomic(page, "the new page\n")
    assert page.read_text() == "the new page\n"
    link = tmp_path / "link.md"  # a page reached through a link: its target is replaced, the link stays
    link.symlink_to(page)
    write_text_atomic(link, "through the link\n")
    assert link.is_symlink() and page.read_text() == "through the link\n"
