"""`reslab bench` end to end at a tiny size: the table, the JSON, and that every pipeline really trained.

No timing assertions: the throughput targets are checked by running the benchmark, not in the suite.
"""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest

from train.allocator import keep_freed_memory
from train.cli import main

PIPELINES = ("ceiling", "reslab", "conventional")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["bench", "--dataset", "cifar10", "--data", str(data_dir), "--batch-size", "16", "--steps", "2",
            "--rounds", "2", "--warmup-steps", "1", "--loader-workers", "1", "--eval-images", "64",
            "--latency-calls", "5", "--out", str(out), "--no-progress"]
    return args, out


@pytest.mark.slow
def test_bench_table_and_json(bench_run, capsys):
    args, out = bench_run
    main(args)
    table = capsys.readouterr().out
    res = json.loads(out.read_text())

    # the table: one row per pipeline with its images/s, the two ratios, and the serving numbers
    rows = {m[1]: m for m in re.finditer(r"^(ceiling|reslab|conventional) +([0-9.]+) +([0-9.]+)x ", table, re.M)}
    assert set(rows) == set(PIPELINES)
    for name, m in rows.items():
        assert float(m[2]) == pytest.approx(res["pipelines"][name]["images_per_sec"], abs=0.05)
    assert "reslab / ceiling" in table and "reslab / conventional" in table
    assert "p50" in table and "p95" in table

    # the JSON: same model, batch and (for ceiling and reslab) precision; what the conventional way uses
    assert (res["dataset"], res["model"], res["batch_size"]) == ("cifar10", "resnet20", 16)
    p = res["pipelines"]
    assert p["ceiling"]["precision"] == p["reslab"]["precision"] == res["precision"]
    assert (p["conventional"]["precision"], p["conventional"]["memory_format"]) == ("fp32", "NCHW")
    assert p["conventional"]["extracted_images"] >= 16 * 2
    # the step is compiled as `reslab train` would for this configuration (30 epochs of batch 16: a long run)
    assert res["compile_reason"].startswith("auto: ")
    assert f"step {'compiled' if res['compile'] else 'eager'} ({res['compile_reason']})" in table
    # the conventional way runs in its own process with glibc's allocator defaults, as a tutorial script does;
    # ceiling and reslab run with the settings every reslab process applies
    assert p["conventional"]["allocator"] == "glibc malloc defaults" and "own process" in p["conventional"]["description"]
    assert p["ceiling"]["allocator"] == p["reslab"]["allocator"] == keep_freed_memory()
    # one DataLoader worker queues 2 batches ahead, so every window starts with 2 + 1 untimed steps
    assert res["queue_depths"] == {"ceiling": 0, "reslab": 0, "conventional": 2} and res["settle_steps"] == 3
    for name in PIPELINES:
        r = p[name]
        # warm-up 1 + 2 rounds x (settle 3 + 1 timed step) = 9 real optimizer steps each
        assert r["steps"] == 9 and r["images"] == 9 * 16
        assert len(r["windows_images_per_sec"]) == 2 and all(w > 0 for w in r["windows_images_per_sec"])
        assert r["loss_finite"] and math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert r["params_changed"], f"{name} did not update its model"
    ratios = res["ratios"]
    for other in ("ceiling", "conventional"):  # paired per round, then the median
        per_round = [a / b for a, b in zip(p["reslab"]["windows_images_per_sec"], p[other]["windows_images_per_sec"])]
        assert ratios[f"reslab_over_{other}"] == pytest.approx(statistics.median(per_round))

    # serving: a model really logged to (and loaded back from) a temporary MLflow store
    s = res["serving"]
    assert s["model_store"] == "temporary" and s["model_uri"].startswith("models:/")
    assert s["eval_images"] == 64 and s["served_eval_images_per_sec"] > 0 and s["engine_eval_images_per_sec"] > 0
    # the served model is the benchmark's own trained model, preprocessed as in training: the same top-1
    # answers as the engine's evaluation (a fresh model, other weights or other normalisation agree ~10-30%)
    assert s["served_top1_agreement"] >= 0.9, s
    assert abs(s["served_eval_accuracy"] - s["engine_eval_accuracy"]) <= 0.1
    assert s["latency_calls"] == 5 and 0 < s["latency_ms_p50"] <= s["latency_ms_p95"]
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch_threads"] >= 1


def test_the_tables_vs_ceiling_column_is_the_paired_ratio():
    """A committed result whose ratio of medians (1.00) differs from its paired ratio (0.97): the table printed
    both, one in the column and the other on the line below it."""
    from pathlib import Path

    from train.bench import format_table

    res = json.loads((Path(__file__).parents[1] / "docs" / "results" / "bench-cifar10-2026-12-07T0900.json").read_text())
    table = format_table(res)
    row = re.search(r"^reslab +[0-9.]+ +([0-9.]+)x ", table, re.M)
    assert float(row[1]) == pytest.approx(res["ratios"]["reslab_over_ceiling"], abs=0.005) == 0.97, table


@pytest.mark.parametrize("name, ceiling, conventional", [
    ("bench-cifar10-eager-2026-12-06T1505.json", "target >= 0.95", "target >= 1.7"),  # AVX2 only: fp32
    ("bench-cifar10-eager-2026-12-06T0310.json", "target >= 0.95", "target >= 2.5"),  # bf16, eager
    ("bench-cifar10-2026-12-07T0900.json", "target >= 0.95", "target >= 3.0"),  # bf16, compiled
    ("bench-cifar10-cuda-resnet20-2026-12-04T1510.json", "no target on this device", "no target on this device"),
])
def test_the_table_reads_each_run_against_its_own_targets(name, ceiling, conventional):
    """The table said "target >= 0.90" and ">= 2.5" for every run: issue 17 asks 0.95 of the ceiling, and of the
    conventional pipeline 2.5x eager and 3.0x compiled on a bf16 CPU, 1.7x on one without bf16."""
    from pathlib import Path

    from train.bench import format_table

    table = format_table(json.loads((Path(__file__).parents[1] / "docs" / "results" / name).read_text()))
    assert re.search(rf"^reslab / ceiling +=.*\({re.escape(ceiling)};", table, re.M), table
    assert re.search(rf"^reslab / conventional +=.*\({re.escape(conventional)};", table, re.M), table


def test_an_fp32_run_on_a_bf16_cpu_is_read_against_the_fp32_target():
    """`reslab bench --precision fp32` on a bf16 CPU was read against the bf16 targets (2.5x/3.0x), set for a
    step twice as fast as the one it measured; the 1.7x is the one set for an fp32 step."""
    from pathlib import Path

    from train.bench import format_table

    res = json.loads((Path(__file__).parents[1] / "docs" / "results" / "bench-cifar10-eager-2026-12-06T0310.json").read_text())
    assert res["machine"]["cpu_bf16"] and res["precision"] == "bf16"
    res["precision"] = "fp32"
    for name in ("ceiling", "reslab"):
        res["pipelines"][name]["precision"] = "fp32"
    assert re.search(r"^reslab / conventional +=.*\(target >= 1\.7;", format_table(res), re.M), format_table(res)


def test_bench_compiles_as_a_run_on_its_subset_would(monkeypatch, data_dir):
    """--subset N was accepted and ignored: the compile decision counted the whole split's steps, so a short
    run's bench measured a compiled step that run would not take. (Stopped right after that decision.)"""
    import train.bench

    class Decided(Exception):
        """Raised by the stand-in decision: the benchmark stops there."""

    steps = []

    def decide(cfg, device, precision, train_steps):
        steps.append(train_steps)
        raise Decided

    monkeypatch.setattr(train.bench, "compile_decision", decide)
    with pytest.raises(Decided):
        main(["bench", "--dataset", "cifar10", "--data", str(data_dir), "--subset", "5000", "--epochs", "3",
              "--batch-size", "100", "--val-fraction", "0.1", "--no-progress"])
    assert steps == [3 * (4500 // 100)]


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--steps", "1", "--rounds", "3"])
    assert e.value.code == 2
    assert "--steps 1 must be at least --rounds 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--pipelines", "ceiling", "magic"])
    assert "unknown pipeline(s) magic" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an IndexError after the whole benchmark had run, and nothing saved
        main(["bench", "--latency-calls", "0"])
    assert "--latency-calls and --eval-images take 1 or more (here 0 and 2000)" in capsys.readouterr().err


needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none here)")


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_bench_on_cuda(data_dir, tmp_path, precision):
    """The same table on a GPU: data resident on the device, autocast (fp16 with a grad scaler); auto resolved on the
    real device (bf16 from compute capability 8, fp16 before it), where the unit test stubs the capability."""
    out = tmp_path / "cuda.json"
    main(["bench", "--dataset", "cifar10", "--data", str(data_dir), "--device", "cuda", "--precision", precision,
          "--batch-size", "64", "--steps", "4", "--rounds", "2", "--warmup-steps", "2", "--settle", "1",
          "--loader-workers", "1", "--eval-images", "256", "--latency-calls", "5", "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    import torch

    expected = precision if precision != "auto" else "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    assert res["device"].startswith("cuda") and res["precision"] == expected and "gpu" in res["machine"]
    for name in PIPELINES:
        r = res["pipelines"][name]
        assert r["loss_finite"] and r["params_changed"], name
