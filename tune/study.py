"""A tuning session from start to registration: what ``reslab tune`` runs in every worker.

Workers sharing a storage share the study, its invocation (one MLflow parent run) and its trial
budget: the invocation's creator queues one trial per unit of budget and workers only take queued
trials (``slots``), so the budget is met exactly; the last worker out (no trial of the invocation
still running) writes the summary and registers the best model, once.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, check_distribution_compatibility
from optuna.exceptions import ExperimentalWarning
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from train.budget import format_duration
from train.config import TrainConfig
from train.data import ImageData, load_dataset
from train.distributed import is_main_process, shutdown
from train.engine import measure_throughput
from train.errors import ReslabWarning
from train.interrupt import end_reason
from train.tracking import experiment_id, first_line, flat_params, setup_tracking, tracking_gone

from . import ddp, parent
from .budget import FULL_TRIALS, MEASURE_SHARE, BudgetPlan, learnt_nothing, majority_share, plan_budget, short_refit
from .finalize import LENGTH, register_base, register_best
from .objective import Objective, TrialFailed, worker_id
from .progress import StudyProgress
from .pruning import OwnInvocation
from .slots import RECIPE_ATTR, SLOT_ATTR, BudgetSpent, SlotStudy
from .space import SearchSpace
from .storage import describe, is_outage, open_storage, reap_dead_local_trials, storage_gone


@dataclass
class TuneOptions:
    base: TrainConfig  # everything not searched (data, model, epochs, ...)
    space: SearchSpace
    study: str
    storage: str | None = None  # None: the journal file in mlruns/optuna
    trials: int = 20  # budget of this invocation, shared by all its workers
    timeout: float | None = None  # seconds from the invocation's start
    pruner: str = "median"  # median | hyperband | none
    prune_after: int = 3  # completed trials before the median pruner may prune
    prune_warmup: int = 1  # epochs a trial always gets before it can be pruned
    heartbeat: int | None = None  # seconds; RDB storages only
    refit: bool = False
    register: bool = True
    experiment: str | None = None
    progress: bool = True
    budget: float | None = None  # seconds for the whole invocation (search + refit + test): tune/budget.py
    min_search_trials: int = FULL_TRIALS  # with a budget: fewer trials of the smallest useful size fit, no search
    started: float = field(default_factory=time.time)  # unix time the budget counts from


def make_pruner(opts: TuneOptions, plan: BudgetPlan | None = None) -> BasePruner:
    """The invocation's pruner; ``plan``: its budget's, whose trials are the plan's length, not the recipe's."""
    if opts.pruner == "median":
        return MedianPruner(n_startup_trials=opts.prune_after, n_warmup_steps=opts.prune_warmup)
    if opts.pruner == "hyperband":  # its brackets span a trial's epochs: a budget's trials are its plan's length
        if plan:
            epochs: int | str = plan.trial_epochs
        else:
            epochs = "auto" if "epochs" in opts.space.distributions else trial_length(opts).epochs
        return HyperbandPruner(min_resource=max(1, opts.prune_warmup), max_resource=epochs, reduction_factor=3)
    if opts.pruner == "asha":  # successive halving over epochs: rungs at epochs 1, 3, 9, ... (--prune-warmup W: W, 3W,
        # 9W, ...); the best third goes on
        asha = SuccessiveHalvingPruner(min_resource=max(1, opts.prune_warmup), reduction_factor=3)
        return OwnInvocation(asha) if opts.budget else asha  # a budget's trials are its invocation's own size
    if opts.pruner == "none":
        return NopPruner()
    raise ValueError(f"unknown pruner {opts.pruner!r}; choose asha, median, hyperband or none")


def run_study(opts: TuneOptions) -> dict[str, Any]:
    """Run (or join) a study invocation; the last worker registers the best model. Under torchrun
    (``--nproc``) rank 0 is the worker and the other ranks train its trials with it."""
    if not ddp.enabled():
        return _run_study(opts)
    ddp.join(opts.base.device)
    if not is_main_process():
        data = load_dataset(opts.base.dataset, opts.base.data, opts.base.download, progress=False)
        out = {"study": opts.study, "finalized_by": None, "followed": ddp.follow(trial_base(opts.base), opts.space, data)}
    else:
        out = _run_study(opts)
        ddp.tell(ddp.STOP)  # only on success: after an exception torchrun stops the other ranks
    shutdown()
    return out


def _run_study(opts: TuneOptions) -> dict[str, Any]:
    setup_tracking()
    base = opts.base
    storage = open_storage(opts.storage, opts.heartbeat)  # a bad URL fails before any data is decoded
    data = load_dataset(base.dataset, base.data, base.download, progress=base.progress)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial replaces Optuna's
    study = optuna.create_study(study_name=opts.study, storage=storage, direction="maximize",
                                pruner=make_pruner(opts), load_if_exists=True)
    known = study.user_attrs.get("dataset")
    if known and known != base.dataset:
        raise ValueError(f"study {opts.study!r} tunes {known}, not {base.dataset}")
    if not known:
        study.set_user_attr("dataset", base.dataset)
    check_resumed_space(study, opts.space)
    exp = experiment_id(opts.experiment or base.dataset)
    worker = f"{worker_id()}:{uuid.uuid4().hex[:6]}"
    params = {
        "study": opts.study, "storage": describe(opts.storage), "pruner": opts.pruner, "prune_after": opts.prune_after,
        "prune_warmup": opts.prune_warmup, "trials": opts.trials, "timeout": opts.timeout, "refit": opts.refit,
        "heartbeat": opts.heartbeat, "search_space": json.dumps(opts.space.describe()),
        **{f"base.{k}": v for k, v in flat_params(base).items()},
    }
    inv, created = parent.join_or_start(study, exp, opts.trials, params, {"dataset": base.dataset, "model": base.model})
    progress: StudyProgress | None = None
    # From here on the invocation's parent run is RUNNING: whatever ends this worker early (Ctrl-C, SIGTERM,
    # an error) while measuring, searching, refitting, testing or registering ends it too, else the next
    # `reslab tune --study` would join a dead invocation and find nothing left to do in it.
    try:
        # The creator's sampler is seeded (a resume continues the stream reproducibly); workers that join
        # draw their own seeds, else they would all propose the same first trials.
        seed = base.seed + inv.finished_before if created else None
        study = SlotStudy(opts.study, storage, make_sampler(opts, inv, seed), study.pruner, inv.number)
        fail_stale(study, opts.heartbeat)  # a dead worker's trial is failed (and queued again) before slots are counted
        plan, pinned = None, {}
        if created:
            study.set_user_attr(settings_key(inv.number), shared_settings(opts))  # the workers that join follow them
            if opts.budget:  # measure this machine, size the trials; stored for the workers that join
                plan = make_plan(opts, data)
                study.set_user_attr(plan_key(inv.number), plan.to_dict())
                study.pruner = make_pruner(opts, plan)
            # a new study's first trial is the base recipe itself: the search starts from what is known to work
            first = opts.space.base_params(base) if inv.finished_before == 0 and not study.trials else None
            pinned = opts.space.pins(base, plan.batch_size_searched) if plan and plan.search else {}
            slots = inv.target - inv.finished_before if plan is None or plan.search else 0  # no search: no trials
            adopted = study.provide(slots, first, pinned)
            if adopted:
                print(f"{adopted} trial(s) queued before this invocation run first", flush=True)
        elif not study.wait_for_slots():
            print("the invocation's creator never queued its trials; nothing to run here", flush=True)
            return {"study": opts.study, "finalized_by": None}
        if not created:
            if plan_key(inv.number) in study.user_attrs:
                plan = BudgetPlan(**study.user_attrs[plan_key(inv.number)])
            opts = follow_creator(study, inv, opts, plan)
        if not created and plan is not None:
            if not plan.search:
                print(f"invocation {inv.number} of study {opts.study} runs no search (its budget is too short); "
                      "its creator refits the base configuration: nothing to run here", flush=True)
                return {"study": opts.study, "finalized_by": None}
        searching = plan is None or plan.search
        print(f"study {opts.study} ({describe(opts.storage)}), invocation {inv.number}: "
              f"{'started' if created else 'joined'} parent run {inv.parent_run_id}; "
              + (f"budget {inv.target - inv.finished_before} trials" if searching else "no trials (no search)")
              + (f", timeout {opts.timeout:.0f} s" if opts.timeout else "") + f"; worker {worker}", flush=True)
        if plan:
            print(plan.describe(), flush=True)
            if created:
                note_plan(inv, plan)
        if pinned:
            note_pinned(inv, pinned)

        trial_cfg = plan.trial_config(trial_base(base)) if plan else trial_base(base)
        if plan:
            timeout = plan.search_timeout(first=created)
            # nor does it finalize before the deadline: the creator's last trial may not have started yet. Past the
            # deadline the invocation's workers are dead or late (on another host, where this one cannot tell):
            # it finishes the invocation as its last worker would (a refit already under way keeps its claim)
            if searching and timeout == 0 and time.time() < plan.deadline:
                print("joined after the search's last trial could start: no trial here; the invocation's other "
                      "workers finish it", flush=True)
                return {"study": opts.study, "finalized_by": None}
        else:
            timeout = None if opts.timeout is None else max(0.0, inv.started + opts.timeout - time.time())
        progress = StudyProgress(inv, study, opts.progress and searching, plan, trial_cfg.epochs)
        callbacks: list[Any] = [progress]
        # a search asked for however short (--min-search-trials 0) is left to run: as the invocation's plan says,
        # which a joining worker without that flag reads too
        if plan and plan.search and plan.min_trials > 0:
            callbacks.append(StopAtChance(inv, data))
        try:
            if searching and (timeout is None or timeout > 0):
                # no n_trials: ask() raises BudgetSpent once the invocation's queued trials are all taken
                study.optimize(Objective(trial_cfg, opts.space, data, exp, inv.parent_run_id, progress.epoch),
                               timeout=timeout, catch=(TrialFailed,), gc_after_trial=True, callbacks=callbacks)
        except BudgetSpent:
            pass
        progress.close()
        return finish(study, inv, worker, opts, data, exp, plan)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (train/interrupt.py)
        if progress is not None:
            progress.close()
        end_after_error(study, inv, e, "KILLED", end_reason(e))
        print(f"\ninterrupted; resume with: reslab tune --study {opts.study} ...")
        raise
    except Exception as e:  # a bug or a broken store: do not leave the parent RUNNING for the next invocation to join
        if progress is not None:
            progress.close()
        first = storage_gone()  # Optuna's own cleanup can bury it (an UnboundLocalError when its tell fails)
        end_after_error(study, inv, first or e, "FAILED")
        if first is not None and first is not e:
            raise first.with_traceback(first.__traceback__) from None
        raise


class StopAtChance:
    """Optuna callback of a budgeted search: when the recipe's own trial (a new study's first; in a resumed study, or
    when the recipe's trial was pruned or failed, the invocation's first complete trial) is no better than always
    answering the majority class, trials this short learn nothing to rank, so the search stops in every worker and
    the refit gets its time (docs/tuning.md: FER-2013 on a slower bf16 CPU, trials at 0.23-0.25 where 'happy' is
    0.25)."""

    def __init__(self, inv: parent.Invocation, data: ImageData) -> None:
        self.inv, self.key = inv, f"search_stopped:{inv.number}"
        k, self.majority = majority_share(data.train_y)
        self.majority_name = data.classes[k]

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.key not in study.user_attrs:
            judged = self.judged(study, trial)
            if judged is None or not learnt_nothing(judged.value, self.majority):
                return
            why = (f"trial {judged.number} reached val_acc {judged.value:.3f}, no better than always answering "
                   f"'{self.majority_name}' ({self.majority:.3f}): trials this short learn nothing to rank")
            study.set_user_attr(self.key, why)
            from mlflow.tracking import MlflowClient
            from tqdm.auto import tqdm

            MlflowClient().set_tag(self.inv.parent_run_id, "search_stopped", why)
            tqdm.write(f"{why}; the search stops and the refit gets its time")  # below the search's bar, not on it
        study.stop()

    def judged(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial | None:
        """The trial the rule judges now that ``trial`` has ended, if any: the recipe's own trial where the invocation
        queued one (with several workers a sampled trial can finish first); once that one is pruned or failed with no
        retry queued, or where there is none, the invocation's first trial to complete (judged once)."""
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(SLOT_ATTR) == self.inv.number]
        # by completion time, not number: a trial another worker started earlier can finish later
        first_complete = min((t for t in mine if t.state == TrialState.COMPLETE),
                             key=lambda t: (t.datetime_complete, t.number), default=None)
        if trial.user_attrs.get(RECIPE_ATTR):
            if trial.state == TrialState.COMPLETE:
                return trial
            retried = any(t.user_attrs.get(RECIPE_ATTR) and t.state in (TrialState.WAITING, TrialState.RUNNING)
                          for t in mine)
            return None if retried else first_complete  # judged when the recipe gave up, if one has completed
        if trial.state != TrialState.COMPLETE or any(
                t.user_attrs.get(RECIPE_ATTR) and t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
                for t in mine):
            return None  # the recipe's trial is still to come (or was judged when it completed)
        return trial if first_complete is not None and first_complete.number == trial.number else None


def check_resumed_space(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study searches what it searched before: Optuna refuses a trial whose choices for a parameter
    differ from the study's earlier trials' (batch sizes follow the base's, so another --batch-size, recipe or
    model changes them). Said at once, in one line, instead of failing the invocation at its first trial."""
    seen: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            new = space.distributions.get(name)
            if name in seen or new is None:
                continue
            seen.add(name)
            try:
                check_distribution_compatibility(old, new)
            except ValueError:
                was = list(old.choices) if isinstance(old, CategoricalDistribution) else type(old).__name__
                now = list(new.choices) if isinstance(new, CategoricalDistribution) else type(new).__name__
                raise ValueError(f"study {study.study_name!r} searched {name} over {was}, this command over {now}: "
                                 "resume it with the settings it began with, or name a new --study") from None


def end_after_error(study: optuna.Study, inv: parent.Invocation, error: BaseException, status: str,
                    reason: str | None = None) -> None:
    """End the parent run after ``error`` if no other worker still runs a trial of the invocation. Best effort:
    a server that outlasted its retry window is not waited for again, and a failure here is a warning line,
    never the error the user sees (that stays ``error``)."""
    try:
        if is_outage(error):  # the storage is gone: whether others still run cannot be known; they end it again
            parent.end(inv, status, reason or f"the study storage is unreachable ({first_line(error)})")
        elif tracking_gone(error):  # MLflow is gone: the next invocation ends the parent (tune/parent.py)
            if not inv.running(study):
                study.set_user_attr(parent.ended_key(inv), status)
        elif not inv.running(study):
            parent.end(inv, status, reason)
    except Exception as e:  # noqa: BLE001 (best effort: the error the user sees is ``error``)
        warnings.warn(f"could not end the study's parent run {inv.parent_run_id} ({first_line(e)})", ReslabWarning)


def note_pinned(inv: parent.Invocation, pinned: dict[str, Any]) -> None:
    """Say (on the console and the parent run) which searched dimensions this invocation's trials keep fixed."""
    from mlflow.tracking import MlflowClient

    client, what = MlflowClient(), ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in pinned.items())
    print(f"every trial keeps the base configuration's {what}: trials this much shorter than the refit favour "
          f"small batches for their extra steps, a choice that loses at full length (docs/tuning.md)", flush=True)
    for k, v in pinned.items():
        client.set_tag(inv.parent_run_id, f"pinned.{k}", str(v))


def note_plan(inv: parent.Invocation, plan: BudgetPlan) -> None:
    """The budget's plan on the parent run, where the MLflow UI shows it: searched or not, and why."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(inv.parent_run_id, "budget_plan", plan.describe())
    client.set_tag(inv.parent_run_id, "search", "yes" if plan.search else "skipped")


def plan_key(invocation: int) -> str:
    return f"{parent.PLAN_ATTR}:{invocation}"


def settings_key(invocation: int) -> str:
    """Study attribute: the settings of an invocation's creator that its joining workers follow."""
    return f"settings:{invocation}"


def shared_settings(opts: TuneOptions) -> dict[str, Any]:
    """How an invocation judges and finishes its trials: the same in every worker, whichever flags each was given."""
    return {"pruner": opts.pruner, "prune_warmup": opts.prune_warmup, "prune_after": opts.prune_after,
            "refit": opts.refit}


def follow_creator(study: optuna.Study, inv: parent.Invocation, opts: TuneOptions, plan: BudgetPlan | None) -> TuneOptions:
    """A joining worker's options with the creator's pruner and refit (and budget: its plan's, or none), its
    study's pruner and sampler rebuilt from them. Before, a worker that joined without the creator's flags pruned its
    trials its own way (a budget's ASHA within the invocation, or the median over the whole study) and refit or not
    its own way. Said in one line where this worker's flags differ."""
    settings = study.user_attrs.get(settings_key(inv.number))
    if settings is None:  # an invocation begun before the settings were recorded
        return opts
    followed = dataclasses.replace(opts, budget=plan.seconds if plan else None, **settings)
    study.pruner = make_pruner(followed, plan)
    study.sampler = make_sampler(followed, inv, None)  # the creator's random start; unseeded, as joiners are
    if settings != shared_settings(opts) or (opts.budget is None) != (plan is None):
        print(f"following invocation {inv.number}'s settings: pruner {settings['pruner']} (warm-up "
              f"{settings['prune_warmup']}, after {settings['prune_after']}), refit {'yes' if settings['refit'] else 'no'}, "
              + (f"budget {format_duration(plan.seconds)}" if plan else "no budget"), flush=True)
    return followed


def make_sampler(opts: TuneOptions, inv: parent.Invocation, seed: int | None) -> TPESampler:
    """TPE with its random start: four trials with a budget (its trials are few), else a third of the invocation's,
    3 to 10. Counted from the invocation, not this worker's --trials, so that every worker of it agrees."""
    startup = 4 if opts.budget else max(3, min(10, (inv.target - inv.finished_before) // 3))
    return TPESampler(seed=seed, n_startup_trials=startup)


def make_plan(opts: TuneOptions, data) -> BudgetPlan:
    """Measure the base configuration's training speed here, then size the search for the budget."""
    t0 = time.perf_counter()
    probe = dataclasses.replace(trial_base(opts.base), time_budget=None)
    rate = measure_throughput(probe, data, max_seconds=MEASURE_SHARE * opts.budget)
    plan = plan_budget(opts.budget, rate, len(data.train_y), probe, started=opts.started, min_trials=opts.min_search_trials)
    print(f"measured {rate:.0f} training images/s in {time.perf_counter() - t0:.1f} s "
          f"({probe.model}, batch {probe.batch_size})", flush=True)
    return plan


def fail_stale(study: optuna.Study, heartbeat: int | None) -> None:
    """Fail the trials of dead workers: by heartbeat (RDB), or by process id on this host."""
    if heartbeat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    reap_dead_local_trials(study)


def trial_base(base: TrainConfig) -> TrainConfig:
    """Trials never see the test split and keep their output to the study's one line each; their
    length is epochs (comparable across trials for the pruner), never a recipe's time budget."""
    return dataclasses.replace(base, evaluate_test=False, progress=False, checkpoint_dir=None, time_budget=None)


def trial_length(opts: TuneOptions) -> TrainConfig:
    """How long this command's trials train: the base, then what its --space file fixes (e.g. ``epochs: 5``)."""
    return dataclasses.replace(trial_base(opts.base), **{k: v for k, v in opts.space.fixed.items() if k in LENGTH})


def finish(study: optuna.Study, inv: parent.Invocation, worker: str, opts: TuneOptions, data, exp: str,
           plan: BudgetPlan | None = None) -> dict[str, Any]:
    """Summary and registration, by the last worker of the invocation only."""
    fail_stale(study, opts.heartbeat)
    others = inv.running(study)
    if others:
        print(f"{len(others)} trial(s) still running in other workers; the last worker registers the best model")
        return {"study": study.study_name, "finalized_by": None}
    key = parent.finalized_key(inv.parent_run_id)
    if study.user_attrs.get(key) or parent.claim(study, key, worker) != worker:
        return {"study": study.study_name, "finalized_by": study.user_attrs.get(key)}
    summary = parent.summarize(study, inv)
    counts = summary["counts"]
    print(f"study {study.study_name}: {inv.finished(study)} trials this invocation; all trials: "
          + (", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "waiting") or "none")
          + (f" ({counts['waiting']} queued slots not started: "
             + ("the search was stopped" if f"search_stopped:{inv.number}" in study.user_attrs else "the search time was spent")
             + ")" if counts.get("waiting") else ""))
    registered, skipped = None, plan is not None and not plan.search
    if opts.register and skipped:
        base, seconds = trial_base(opts.base), plan.refit_seconds()
        if (narrow := short_refit(base, plan.images_per_sec, seconds, len(data.train_y))) is not None:
            base, why = narrow
            print(why, flush=True)
        registered = register_base(study, base, opts.space.base_params(base), data, exp, inv.parent_run_id,
                                   seconds, opts.progress)
    elif opts.register and "best_trial" in summary:
        print(f"best trial {summary['best_trial']}: val_acc {summary['best_value']:.4f} {summary['best_params']}")
        refit_budget = plan.refit_seconds() if plan else None
        registered = register_best(study, data, exp, inv.parent_run_id, opts.refit or plan is not None,
                                   refit_budget, opts.progress, trial_length(opts))
    if registered and not registered.get("already"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for k in ("name", "version", "alias", "test_acc"):
            client.set_tag(inv.parent_run_id, f"registered.{k}", str(registered[k]))
        source = "the base configuration (no search)" if skipped else f"trial {registered['trial']}"
        print(f"test accuracy {registered['test_acc']:.4f}; registered {registered['name']} version "
              f"{registered['version']} (alias: {registered['alias']}) from {source}")
    parent.end(inv)
    return {"study": study.study_name, "finalized_by": worker, "summary": summary, "registered": registered,
            "searched": not skipped, "parent_run_id": inv.parent_run_id}
