"""Time budgets: a run sized in seconds ends on time on whatever machine runs it, and a budgeted
study splits its minutes as tune/budget.py says."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from train.budget import (CALIBRATION_MIN_STEPS, CALIBRATION_SKIP, CALIBRATION_STEPS, Horizon, TimeBudget, format_duration,
                          parse_duration)
from train.config import TrainConfig
from train.engine import fit, measure_throughput
from tune.budget import (FINISH_RESERVE, FULL_TRIALS, MIN_TRIAL_EPOCHS, MIN_TRIAL_IMAGES, SEARCH_SHARE, TRIAL_OVERHEAD,
                         plan_budget, short_refit)

# Runs here must end within their wall-clock budgets: `make test` runs this module alone, not beside another worker.
pytestmark = pytest.mark.serial

RECIPE = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 32}, epochs=14, batch_size=512,
                     lr=0.4, tta=True, ema=0.99).resolved()


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1h30m", 45)] == [90, 90, 1800, 7200, 5400, 45]
    for bad in ("2 hours", "m", "10x"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert TrainConfig.from_dict({"time_budget": "13m"}).time_budget == 780
    with pytest.raises(ValueError, match="above 0"):
        TrainConfig.from_dict({"time_budget": "0s"})


def test_horizon_plan_spends_what_is_left():
    b = TimeBudget(seconds=100, steps_per_epoch=50, batch_size=100, val_images=1000, final_images=2000)
    # 0.1 s a step, 20 s spent: 80 s left, less the final evaluation and each epoch's validation
    total = b.plan(step=200, wall_seconds=20, seconds_per_step=0.1, val_seconds_per_epoch=1.0)
    final = 1.0 * 2000 / 1000  # sized from the timed validation: the same network, views and image size
    assert total == 200 + int((80 - final) / (0.1 + 1.0 / 50))
    # before a validation is timed, from the training step; a 40-px crop's step makes a 48-px evaluation 1.44x dearer
    untimed = 200 + int((80 - b.eval_seconds(2000, 0.1)) / (0.1 + b.eval_seconds(1000, 0.1) / 50))
    assert b.plan(step=200, wall_seconds=20, seconds_per_step=0.1) == untimed
    cropped = TimeBudget(100, 50, 100, 1000, 2000, eval_pixels=(48 / 40) ** 2)
    assert cropped.eval_seconds(2000, 0.1) == pytest.approx(1.44 * b.eval_seconds(2000, 0.1))
    assert cropped.plan(step=200, wall_seconds=20, seconds_per_step=0.1) < untimed
    assert b.plan(step=200, wall_seconds=120, seconds_per_step=0.1) == 200  # over budget: stop now
    assert b.plan(step=200, wall_seconds=20, seconds_per_step=0.2) < total  # a slower machine: a shorter schedule


@pytest.mark.parametrize("rate", [250.0, 1000.0, 20000.0])  # AVX2-only CPU, bf16 CPU, a GPU (images/s)
def test_study_plan_scales_with_the_machine(rate):
    budget, train_images = 600.0, 50000
    plan = plan_budget(budget, rate, train_images, RECIPE, started=0.0)
    assert plan.search_seconds == pytest.approx(SEARCH_SHARE * budget)
    # the AVX2-only CPU's quarter of 10 minutes is too short for 3 trials of the smallest useful size
    assert plan.search == (rate > 250) and ("too short to search" in plan.describe()) == (rate == 250)
    assert plan.trial_epochs >= MIN_TRIAL_EPOCHS
    subset = plan.trial_subset or train_images
    assert subset >= min(train_images, MIN_TRIAL_IMAGES)
    if subset > MIN_TRIAL_IMAGES + 1500:  # not at the floor: FULL_TRIALS unpruned trials fit the search time
        assert plan.trial_seconds * FULL_TRIALS <= plan.search_seconds + FULL_TRIALS * (TRIAL_OVERHEAD + 1)
    assert plan.refit_seconds(now=plan.search_seconds) > 0.6 * budget  # the refit gets most of it
    assert 0 < plan.search_timeout(now=0.0) <= plan.search_seconds
    # past the search's end the creator still runs one trial; a worker joining then runs none
    late = plan.search_seconds + 1
    assert plan.search_timeout(now=late) == 1.0 and plan.search_timeout(now=late, first=False) == 0.0
    assert plan.deadline == budget


def test_faster_machines_get_higher_fidelity():
    slow, fast, gpu = (plan_budget(600, r, 50000, RECIPE, started=0) for r in (250, 1000, 20000))
    assert (slow.trial_subset or 50000) < (fast.trial_subset or 50000)
    assert gpu.trial_subset is None and gpu.trial_epochs > MIN_TRIAL_EPOCHS  # all the data, more epochs
    # batch sizes are ranked only by trials that are the recipe's whole run (on the GPU here); on the CPUs
    # a trial trains about a tenth of the refit's images, and the recipe's batch size is kept
    assert gpu.trial_epochs == RECIPE.epochs and gpu.batch_size_searched
    assert not slow.batch_size_searched and not fast.batch_size_searched
    assert gpu.trial_epochs <= RECIPE.epochs


def test_a_search_too_short_to_rank_anything_gives_its_time_to_the_refit():
    """`make run` on an AVX2-only CPU (2026-12-06): CIFAR-10's 11 minutes at 197 images/s and FER-2013's 9 at
    148 left searches of ~2.1 and ~1.3 trials of the smallest useful size, which ranked configurations on
    noise; such a search is not run, and the plan says which budget would search."""
    for seconds, rate, images in ((660, 197, 50000), (540, 148, 28709)):
        plan = plan_budget(seconds, rate, images, RECIPE, started=0)
        assert not plan.search and plan.search_needs > plan.search_seconds
        assert plan.refit_seconds(now=30) == pytest.approx(seconds - 30 - FINISH_RESERVE)  # the refit gets it all
        enough = 60 * math.ceil(plan.search_needs / SEARCH_SHARE / 60)  # "a budget of M:00 or more searches"
        assert f"a budget of {format_duration(enough)} or more searches" in plan.describe()
        assert plan_budget(enough, rate, images, RECIPE, started=0).search
        assert not plan_budget(enough - 60, rate, images, RECIPE, started=0).search
        assert plan_budget(seconds, rate, images, RECIPE, started=0, min_trials=2).search == (rate == 197)
    assert plan_budget(660, 930, 50000, RECIPE, started=0).search  # a bf16 CPU searches the same 11 minutes


def test_a_refit_too_short_for_its_width_trains_a_narrower_net():
    """`make run` on an AVX2-only CPU (2026-12-06): FER-2013's 507 s refit at 131 images/s is ~2.3 epochs of
    ResNet-9 at width 32 (51.2% and 57.5% test for two seeds); width 16 trains ~5 epochs in the same time
    (docs/tuning.md). Four epochs or more keep the recipe's width; widths halve, not below 16."""
    fer = dataclasses.replace(RECIPE, dataset="fer2013", batch_size=256, lr=0.2)
    narrow, why = short_refit(fer, 131, 507, 28709)
    assert narrow == dataclasses.replace(fer, model_args={"width": 16}) and fer.model_args == {"width": 32}
    assert why == "8:27 trains resnet9 at width 32 for ~2.3 epochs here (under 4): the refit trains width 16 instead"
    assert short_refit(fer, 131, 4 * 28709 / 131 + 1, 28709) is None  # four epochs: kept
    assert short_refit(narrow, 60, 507, 28709) is None  # already the narrowest
    assert short_refit(dataclasses.replace(fer, model_args={}), 60, 507, 28709)[0].model_args == {"width": 32}  # 64 -> 32
    assert short_refit(dataclasses.replace(fer, model="resnet20", model_args={}), 60, 507, 28709) is None  # no width


@pytest.mark.parametrize("args, message", [
    (["--min-search-trials", "2"], "--min-search-trials needs --budget"),
    (["--budget", "1m", "--min-search-trials", "-1"], "--min-search-trials must be 0 (always search) or more"),
    # a --subset the budget would silently ignore (trials sized from all images, the refit on all of them)
    (["--budget", "1m", "--subset", "500"], "--budget sizes its trials' subsets and refits on every training image: give "
     "no subset (here 500, from --subset or a recipe's or --config's `subset`); point --data at a smaller copy to tune on less"),
    # a --space file's fixed epochs replaced the plan's trial length: a 3-epoch plan ran 20-epoch trials
    (["--budget", "1m", "--space", "{tmp}/space.yaml"], "--budget sizes its trials itself: leave epochs out of the --space file"),
])
def test_budget_bad_input_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    from train.cli import main

    (tmp_path / "space.yaml").write_text("epochs: 20\nlr: [0.1, 0.2]\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    monkeypatch.chdir(tmp_path)  # had the check gone, the study would fail at once on the missing data, here
    monkeypatch.setenv("RESLAB_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as e:
        main(["tune", "--dataset", "cifar10", "--data", str(tmp_path / "no-data"), "--no-progress", *args])
    assert e.value.code == 2 and capsys.readouterr().err == f"reslab: error: {message}\n"


def test_min_trials_0_searches_with_trials_that_fit():
    """``--min-search-trials 0``, an AVX2-only CPU (227 images/s measured, batch 512) and a one-minute study
    on 2,000 images: three epochs of the whole split (~28 s) do not fit a 16 s search, so the trial gets
    fewer epochs rather than eat the refit's time; a longer search keeps the three."""
    assert not plan_budget(66, 227, 2000, RECIPE, started=0).search
    short = plan_budget(66, 227, 2000, RECIPE, started=0, min_trials=0)
    assert short.search and short.trial_subset is None and 1 <= short.trial_epochs < MIN_TRIAL_EPOCHS
    assert short.trial_seconds <= short.search_seconds
    assert not short.batch_size_searched
    longer = plan_budget(300, 227, 2000, RECIPE, started=0, min_trials=0)
    assert longer.trial_epochs >= MIN_TRIAL_EPOCHS and longer.trial_seconds <= longer.search_seconds


def test_budgeted_runs_end_on_time_and_scale_their_schedule(cifar):
    """Two budgets on the same data: each ends within its budget (plus the first steps' timing slack),
    and twice the budget trains about twice as many steps. The length was never given in epochs."""
    runs = {}
    for seconds in (8.0, 16.0):
        cfg = TrainConfig(dataset="cifar10", model="resnet20", subset=4000, batch_size=64, time_budget=seconds,
                          evaluate_test=False, progress=False, val_fraction=0.1)
        t0 = time.perf_counter()
        result = fit(cfg, cifar)
        runs[seconds] = (time.perf_counter() - t0, result)
        b = result.extra["budget"]
        assert b["budget_seconds"] == seconds
        assert b["budget_wall_seconds"] <= seconds * 1.15 + 1.0, b
        # and as the caller's clock sees it, model build and the first steps' set-up included (the engine's
        # clock starts after them)
        assert runs[seconds][0] <= seconds * 1.15 + 5.0, (runs[seconds][0], b)
        assert result.history[-1]["step"] == b["budget_steps"]  # it trained the horizon it planned
        assert result.config.epochs == len(result.history)
    short, long = runs[8.0][1].extra["budget"]["budget_steps"], runs[16.0][1].extra["budget"]["budget_steps"]
    # Each budget also pays a fixed start (model build, calibration, validation): with o seconds of it the ratio
    # is (16 - o) / (8 - o), 2.6 at o = 3 and 3.0 at o = 4, which a cold AVX2-only CPU reached (25 and 75 steps,
    # 2026-12-07); a budget ignored gives ~1.
    assert 1.5 * short < long < 4 * short, (short, long)


def test_a_budget_outlasts_a_configured_length_shorter_than_its_calibration(cifar):
    """A budgeted run whose configured length (one epoch of 5 steps, as a refit configured from a one-epoch
    tuning trial on a small dataset) ends before the calibration's 10 steps still plans from its budget and
    spends it, instead of ending at that length with most of the budget unspent."""
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=400, batch_size=64,
                      epochs=1, time_budget=8.0, evaluate_test=False, progress=False, val_fraction=0.0)
    result = fit(cfg, cifar)
    b = result.extra["budget"]
    assert len(result.history) > 1 and b["budget_steps"] > 10, b  # more than the configured 1 epoch of 6 steps
    assert 0.6 * 8.0 <= b["budget_wall_seconds"] <= 8.0 * 1.15 + 1.0, b


def test_measured_throughput_is_plausible(cifar):
    cfg = TrainConfig(dataset="cifar10", model="resnet20", batch_size=64, progress=False)
    rate = measure_throughput(cfg, cifar)
    t0 = time.perf_counter()
    fit(TrainConfig(dataset="cifar10", model="resnet20", subset=3200, batch_size=64, epochs=1, val_fraction=0,
                    evaluate_test=False, progress=False), cifar)
    fit_rate = 3200 / (time.perf_counter() - t0)  # includes model build: a lower bound of the step rate
    assert 0.5 * fit_rate < rate < 4 * fit_rate, (rate, fit_rate)


def test_measuring_stops_at_its_time_limit(cifar, monkeypatch):
    """A slow machine: the calibration stops once its timed steps took ``max_seconds`` (three steps at
    least, for the median), not after all eight; without a limit it times all of them."""
    import train.engine

    cfg = TrainConfig(dataset="cifar10", model="resnet20", subset=3000, batch_size=32, progress=False)
    real, calls = train.engine.make_stepper, [0]

    def counting_stepper(*args, **kwargs):
        stepper = real(*args, **kwargs)

        def step(x, y):
            calls[0] += 1
            return stepper(x, y)
        return step

    monkeypatch.setattr(train.engine, "make_stepper", counting_stepper)
    assert measure_throughput(cfg, cifar, max_seconds=1e-6) > 0
    assert calls[0] == CALIBRATION_SKIP + CALIBRATION_MIN_STEPS
    calls[0] = 0
    assert measure_throughput(cfg, cifar) > 0
    assert calls[0] == CALIBRATION_SKIP + CALIBRATION_STEPS


def test_one_slow_step_does_not_skew_the_measured_throughput(cifar, monkeypatch):
    """Something else on the machine stalls one calibration step: the rate a budget is planned from
    must stay what the step does (the suite once saw it halved by a single stall)."""
    import train.engine

    cfg = TrainConfig(dataset="cifar10", model="resnet20", batch_size=64, progress=False)
    quiet = measure_throughput(cfg, cifar)
    real, calls = train.engine.make_stepper, [0]

    def stalling_stepper(*args, **kwargs):
        stepper = real(*args, **kwargs)

        def step(x, y):
            calls[0] += 1
            if calls[0] == 6:  # a timed step, 0.6 s: longer than the other timed steps together
                time.sleep(0.6)
            return stepper(x, y)
        return step

    monkeypatch.setattr(train.engine, "make_stepper", stalling_stepper)
    stalled = measure_throughput(cfg, cifar)
    assert calls[0] >= 6
    assert 0.6 * quiet < stalled < 1.6 * quiet, (quiet, stalled)


def test_horizon_is_read_by_the_schedule():
    import torch

    from train.engine import make_stepper

    cfg = TrainConfig(dataset="cifar10", model="resnet20", schedule="onecycle", warmup=0.5, lr=1.0).resolved()
    model = torch.nn.Linear(2, 2)
    horizon = Horizon(100)
    stepper = make_stepper(cfg, model, horizon, torch.device("cpu"), "fp32")
    for _ in range(10):
        stepper.opt.step()
        stepper.sched.step()
    assert stepper.sched.get_last_lr()[0] == pytest.approx(10 / 50)  # warming up over 50 steps
    horizon.total = 1000  # the budget's plan: a longer run, so a slower warm-up from here on
    stepper.opt.step()
    stepper.sched.step()
    assert stepper.sched.get_last_lr()[0] == pytest.approx(11 / 500)


def test_a_run_that_slows_down_mid_epoch_still_ends_on_time(cifar, monkeypatch):
    """A single long epoch whose steps become 50 ms slower after the first plan (another job taking the
    cores): the plan is renewed within the epoch, so the run still ends within its budget. Planned only
    at the calibration and at epoch ends, it overran (measured: ~18 s for a 10 s budget)."""
    from train import engine

    calls = {"n": 0}
    real_call = engine.Stepper.__call__

    def loaded(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 40:
            time.sleep(0.05)
        return real_call(self, *a, **k)

    monkeypatch.setattr(engine.Stepper, "__call__", loaded)
    cfg = TrainConfig(dataset="cifar10", model="resnet20", subset=20000,
                      batch_size=32, time_budget=10.0, evaluate_test=False, progress=False, val_fraction=0.01)
    result = fit(cfg, cifar)
    b = result.extra["budget"]
    assert len(result.history) == 1 and calls["n"] > 40  # one epoch, slowed down inside it
    assert b["budget_wall_seconds"] <= 10.0 * 1.15 + 1.0, b


@pytest.mark.parametrize("end", [20, 30])
def test_a_schedule_that_reached_its_end_is_not_reopened(cifar, monkeypatch, end):
    """The run ends where its plan ended the schedule, mid-epoch or not: an epoch-end plan that finds time
    left does not start another epoch of a few steps at a learning rate climbing again from zero (seen once
    in the suite: a 10 s run planned to step 151 ended its epoch there, then trained one more step as
    "epoch 2"), nor does an in-epoch plan due at the very step the schedule ends (step 30: the first plan's
    step 10 plus the 20 steps between plans). The plans here are scripted: the first ends the schedule at
    ``end``; a later one keeps it, unless it comes at or after the end, where it asks for 10 steps more."""
    from train import engine

    plans = []

    def scripted(budget, horizon, step, *a, **k):
        horizon.total = end if not plans else horizon.total if step < horizon.total else min(step + 10, end + 20)
        plans.append((step, horizon.total))

    monkeypatch.setattr(engine, "plan_horizon", scripted)
    cfg = TrainConfig(dataset="cifar10", model="resnet20", subset=2000, batch_size=32, time_budget=60.0,
                      evaluate_test=False, progress=False, val_fraction=0.05)
    result = fit(cfg, cifar)
    assert plans[0] == (10, end)  # the first plan, after the calibration steps
    assert [h["step"] for h in result.history] == [end] and result.history[0]["horizon_steps"] == end
    assert result.extra["budget"]["budget_steps"] == end


def test_the_end_of_a_budget_is_planned_from_the_recent_speed(monkeypatch):
    """A fake clock: steps take 1 s, then 2 s from step 36 on (another job took the cores); 60 steps an epoch, so
    the last in-epoch plan (step 50) is 10 steps before the epoch's end, too few to time. The epoch-end plan must
    still come from the recent steps (since step 30: 55 s for 30 steps), not from the whole run's average since
    its timing began (83 s for 58 steps), which promised 5 steps more than the 35 s left could hold."""
    from train import engine
    from train.data import ImageData

    clock = {"t": 0.0, "steps": 0}
    real_call = engine.Stepper.__call__

    def timed(self, *a, **k):
        clock["steps"] += 1
        clock["t"] += 1.0 if clock["steps"] <= 35 else 2.0
        return real_call(self, *a, **k)

    monkeypatch.setattr(engine.Stepper, "__call__", timed)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock["t"])
    rng = np.random.default_rng(0)
    data = ImageData("cifar10", [str(i) for i in range(10)], rng.integers(0, 256, (960, 16, 16, 3), dtype=np.uint8),
                     rng.integers(0, 10, 960), np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, batch_size=16, time_budget=120.0,
                      evaluate_test=False, progress=False, val_fraction=0.0, compile=False, epochs=1)
    result = fit(cfg, data)
    first = result.history[0]
    assert first["step"] == 60 and first["wall_seconds"] == 35 + 25 * 2  # the scenario as described
    # 35 s left at the recent 55/30 s a step: 19 steps, so the horizon is 79 (from the run's average: 84)
    assert first["horizon_steps"] == 79, first
    # and in the last stretch the plan is renewed every 5 steps (timed over 20 or more), so the run ends within its
    # budget: the next plan 20 steps on came after it (79 steps, 123 s), and from the run's average 84 steps took 133 s
    assert clock["t"] <= 120 and result.history[-1]["step"] == 77, (clock["t"], result.history[-1])


def test_the_last_epochs_validation_is_the_final_one(monkeypatch):
    """The last epoch's validation saw the final weights, so the run does not evaluate them again: a run that ended
    mid-epoch (a budget's usual end) paid two validation passes, one more than its plan counted."""
    from train import engine
    from train.data import ImageData

    calls = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    rng = np.random.default_rng(0)
    data = ImageData("cifar10", [str(i) for i in range(10)], rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8),
                     rng.integers(0, 10, 300), np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, batch_size=32, epochs=2,
                      evaluate_test=False, progress=False, val_fraction=0.2, compile=False)
    result = fit(cfg, data)
    assert calls == [61, 61], calls  # one validation (61 images: a stratified fifth) per epoch, none after
    assert result.val.accuracy == result.history[-1]["val_acc"]
    calls.clear()
    fit(dataclasses.replace(cfg, restore_best=True), data)  # the best epoch's weights put back: evaluated again
    assert calls == [61, 61, 61], calls


def test_a_budget_mostly_spent_on_the_final_evaluation_says_so():
    """`reslab train --recipe fast-cpu --dataset fer2013 --time-budget 3m` on an AVX2-only CPU trained 24 s and scored
    4.0%, below chance, without a word: the test split's six TTA views (~150 s there) took the rest. The first plan
    now warns when the final evaluation is expected to take half the budget or more."""
    from train.errors import ReslabWarning

    fer = TimeBudget(180, 108, 256, 1435, 1435 + 7178, eval_views=6, eval_pixels=(48 / 40) ** 2)
    step = 256 / 160  # seconds a step of 256 at the 160 images/s make run measured for this recipe there
    line = fer.evaluation_warning(step)
    assert line and line.startswith("the final evaluation (8,613 images x 6 view(s)) is estimated at 2:43 of the 3:00 budget")
    assert "--tta 0 or 1" in line
    assert dataclasses.replace(fer, seconds=1740).evaluation_warning(step) is None  # the recipe's own 29 minutes
    assert dataclasses.replace(fer, eval_views=1).evaluation_warning(step) is None  # one view: 28 s

    from train.data import ImageData

    rng = np.random.default_rng(0)
    data = ImageData("cifar10", [str(i) for i in range(10)], rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8),
                     rng.integers(0, 10, 400), rng.integers(0, 256, (8000, 16, 16, 3), dtype=np.uint8),
                     rng.integers(0, 10, 8000), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, batch_size=16, time_budget=1.0,
                      tta=2, progress=False, val_fraction=0.0, compile=False)
    with pytest.warns(ReslabWarning, match="the final evaluation .8,000 images x 6 view.s.. is estimated at"):
        fit(cfg, data)


def test_a_budget_that_buys_too_few_epochs_trains_a_narrower_net_and_logs_it(cifar, data_dir, mlflow_store, tmp_path, capsys):
    """``--min-budget-epochs N`` (the airbench recipe's 5): a budget that buys fewer than N epochs of the model at
    its width, measured here, trains half the width, then a quarter, ... down to 16; the run's parameters say the
    width that trained, a tag and a line say why, and the measurements count against the budget. (airbench at
    width 64 gets ~2.5 epochs of its 14m20s on an AVX2-only CPU, at width 32 ~8: 90.5% test, docs/performance.md.)"""
    import mlflow

    from train.cli import main
    from train.engine import fit_width

    config = tmp_path / "wide.yaml"
    config.write_text("model: resnet9\nmodel_args: {width: 32}\n")
    main(["train", "--data", str(data_dir), "--config", str(config), "--subset", "2000", "--val-fraction", "0.1",
          "--batch-size", "64", "--tta", "0", "--time-budget", "20s", "--min-budget-epochs", "50", "--no-progress",
          "--run-name", "narrowed"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("a 0:20 budget buys under 50 epochs"))
    assert line.startswith("a 0:20 budget buys under 50 epochs of resnet9 at width 32 here: training width 16 instead "
                           "(measured width 32: "), out
    assert "; width 16: " in line and "img/s" in line  # both widths measured, 16 the narrowest: no further
    (run,) = mlflow.search_runs(experiment_names=["cifar10"], filter_string="attributes.run_name = 'narrowed'",
                                output_format="list")
    assert run.data.params["model_args.width"] == "16" and run.data.params["min_budget_epochs"] == "50"
    assert run.data.tags["budget_width"] == line
    assert run.data.metrics["budget_wall_seconds"] <= 20 * 1.15 + 1.0, run.data.metrics

    # a budget that buys enough epochs keeps the configuration as given (the same object)
    enough = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 32}, subset=600, batch_size=64,
                         time_budget=600.0, min_budget_epochs=2, evaluate_test=False, progress=False)
    kept, why = fit_width(enough, cifar)
    assert kept is enough and why is None
    # weights from a file (--init-from, --pretrained) are the width they are: never narrowed, however short the budget
    weights = dataclasses.replace(enough, min_budget_epochs=10**6, pretrained="weights.pt")
    assert fit_width(weights, cifar) == (weights, None)
    # the airbench recipe's minimum goes with its budget: --epochs replaces both (it was logged, doing nothing)
    from train.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["train", "--recipe", "airbench"])).min_budget_epochs == 5
    assert config_from_args(build_parser().parse_args(["train", "--recipe", "airbench", "--epochs", "3"])).min_budget_epochs == 0
    # fast-cpu's FER-2013 section has one (10: 68.1% against 64.0% on an AVX2-only CPU), its CIFAR-10 section none
    fast = ["train", "--recipe", "fast-cpu"]
    assert config_from_args(build_parser().parse_args([*fast, "--dataset", "fer2013"])).min_budget_epochs == 10
    assert config_from_args(build_parser().parse_args(fast)).min_budget_epochs == 0


def test_time_spent_before_fit_counts_against_the_budget_and_the_estimate_matches_the_plan(cifar):
    """``fit(spent=s)``: the width's measurements run before the run's own clock starts; a run that did not count them
    would overrun its budget by them. And :func:`budget_epochs`, which decides the width, predicts the epochs the run
    then plans (within a factor 1.6: 0.82-1.11 of it in four runs on an AVX2-only CPU; 2.0-2.7x with the spent
    seconds left out)."""
    from train.engine import budget_epochs

    cfg = TrainConfig(dataset="cifar10", model="resnet9", model_args={"width": 8}, subset=2000, batch_size=64,
                      time_budget=12.0, evaluate_test=False, progress=False, val_fraction=0.1)
    rate = measure_throughput(cfg, cifar)
    t0 = time.perf_counter()
    result = fit(cfg, cifar, spent=6.0)
    took = time.perf_counter() - t0
    assert took <= (12.0 - 6.0) * 1.15 + 3.0, (took, result.extra["budget"])  # without it: ~12 s
    planned = result.extra["budget"]
    assert 6.0 < planned["budget_wall_seconds"] <= 12.0 * 1.15 + 1.0
    estimate = budget_epochs(cfg, rate, 1800, 200, 0, cifar.image_size, spent=6.0)
    assert planned["budget_epochs"] / 1.6 <= estimate <= planned["budget_epochs"] * 1.6, (estimate, planned, rate)
