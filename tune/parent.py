"""One MLflow parent run per study invocation, shared by every worker of that invocation.

The first worker creates the parent run and stores an *invocation* record (parent run id, trial
budget) in the study's user attributes; workers that start while that parent is still RUNNING join
it. Optuna's storage has no compare-and-swap, so a contested claim is an election: each contender
writes a candidate attribute of its own (no one overwrites anyone), waits for concurrent writes to
land, and the earliest candidate wins for everyone. A later contender can never beat an earlier one,
so a worker that joined the winner can never see it deleted; losers delete what they created.
(Last-writer-wins, the first design, let a worker join a candidate that a still later write then
beat and deleted: "Cannot start run under parent run ... in the deleted state".)
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from .slots import ready_key
from .storage import worker_alive, worker_id

INVOCATION_ATTR = "invocation"
MEMBER_ATTR = "member"  # member:<invocation>:<host:pid:start>, one per worker of that invocation
PLAN_ATTR = "plan"  # plan:<invocation>, the budget's plan (tune/budget.py), stored by its creator
SETTLE_SECONDS = 0.5  # long enough for a concurrent writer's attribute to land
ABANDONED = "its workers died before it ended (killed?): the next invocation started instead of joining it"


@dataclass
class Invocation:
    parent_run_id: str
    number: int  # 1 for the study's first invocation, 2 after a resume, ...
    finished_before: int  # finished trials when this invocation began
    target: int  # finished trials at which this invocation's budget is spent
    started: float  # unix time; RUNNING trials older than this belong to dead workers
    creator: str = ""  # host:pid:start of the worker that started it ("" in records written before this field)

    def finished(self, study: optuna.Study) -> int:
        """Trials of this invocation that are finished (complete, pruned or failed)."""
        return finished_count(study) - self.finished_before

    def running(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """Trials of this invocation still running, in any worker."""
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.datetime_start is not None and t.datetime_start.timestamp() >= self.started - 1]


def finished_count(study: optuna.Study) -> int:
    """Finished trials, not counting those a heartbeat retry replaced (their copy runs instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    return sum(t.state.is_finished() and t.number not in retried for t in trials)


def claim(study: optuna.Study, key: str, me: str, value: Any = None) -> Any:
    """Elect one contender for ``key``: returns the winner's value (``value`` defaults to ``me``).

    Each contender writes ``key@me`` with its clock; after SETTLE_SECONDS every contender sees the
    same earliest candidate unless a write took longer than that to land. The winner's value is
    also stored under ``key`` itself, for those who come after the election.
    """
    value = me if value is None else value
    study.set_user_attr(f"{key}@{me}", {"at": time.time(), "value": value})
    time.sleep(SETTLE_SECONDS)
    attrs = study.user_attrs
    candidates = [(c["at"], name, c["value"]) for name, c in attrs.items() if name.startswith(f"{key}@")]
    winner = min(candidates, key=lambda c: c[:2])[2]
    if winner == value:
        study.set_user_attr(key, value)
    return winner


def join_or_start(study: optuna.Study, experiment_id: str, trials: int, params: dict[str, str],
                  tags: dict[str, str], after: int = 0) -> tuple[Invocation, bool]:
    """Join the running invocation of ``study`` or start a new one (numbered above ``after``: an election's dead
    winner); returns (invocation, created)."""
    client = MlflowClient()
    current = study.user_attrs.get(INVOCATION_ATTR)
    if current and study.user_attrs.get(f"ended:{current['parent_run_id']}"):
        end_left_running(client, current["parent_run_id"], study.user_attrs[f"ended:{current['parent_run_id']}"])
    if current and _is_running(client, current["parent_run_id"]):
        if not abandoned(study, current["number"], current["parent_run_id"]):
            join(study, current["number"])
            return Invocation(**current), False
        end_left_running(client, current["parent_run_id"], "KILLED", ABANDONED, child_status="KILLED")
    number = max((current or {}).get("number", 0), after) + 1
    finished = finished_count(study)
    run = client.create_run(experiment_id, run_name=f"{study.study_name}#{number}",
                            tags={**tags, "optuna.study": study.study_name, "invocation": str(number), "kind": "study"})
    mine = Invocation(run.info.run_id, number, finished, finished + trials, time.time(), worker_id())
    join(study, number)
    winner = claim(study, f"{INVOCATION_ATTR}#{number}", mine.parent_run_id, asdict(mine))
    if winner["parent_run_id"] != mine.parent_run_id:  # another worker started the same invocation first
        client.delete_run(mine.parent_run_id)
        if died_in_election(client, study, winner):  # every later election for this number elects it again
            end_left_running(client, winner["parent_run_id"], "KILLED", ABANDONED, child_status="KILLED")
            return join_or_start(study, experiment_id, trials, params, tags, after=number)
        return Invocation(**winner), False
    study.set_user_attr(INVOCATION_ATTR, asdict(mine))
    client.log_batch(mine.parent_run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return mine, True


def join(study: optuna.Study, number: int) -> None:
    """Record this process as a worker of invocation ``number`` (host:pid:start), so that a later command can
    tell an invocation whose workers all died from one that still runs (:func:`abandoned`)."""
    study.set_user_attr(f"{MEMBER_ATTR}:{number}:{worker_id()}", time.time())


def died_in_election(client: MlflowClient, study: optuna.Study, winner: dict[str, Any]) -> bool:
    """Whether the invocation that won an election will never run: it has been ended (by another worker that found
    it dead), or its creator is a dead process on this host that never queued its trials (killed during the
    election's half second). Its other contenders are alive and on record, so only the creator is asked."""
    if not _is_running(client, winner["parent_run_id"]):
        return True
    creator = winner.get("creator", "")
    return (creator.startswith(f"{socket.gethostname()}:") and not worker_alive(creator)
            and ready_key(winner["number"]) not in study.user_attrs)


def abandoned(study: optuna.Study, number: int, parent_run_id: str) -> bool:
    """Whether invocation ``number`` is dead and joining it would do nothing useful: every worker it recorded
    ran on this host and is gone (a ``kill -9``, a crash of the machine's session), and either it had a
    ``--budget`` (its plan and deadline were another command's; a joiner could only watch the time run out,
    and the new command's own budget would never be spent), or its creator died before queueing its trials
    (a joiner waits for them in vain), or its last worker died while finalizing (the refit: a joiner finds
    the finalization claimed and nothing to run). A plain invocation with trials left is joined and continued,
    as a resume. Workers on other hosts cannot be checked from here: they count as alive."""
    attrs, host = study.user_attrs, socket.gethostname()
    members = [k.split(":", 2)[2] for k in attrs if k.startswith(f"{MEMBER_ATTR}:{number}:")]
    if not members or any(not m.startswith(f"{host}:") or worker_alive(m) for m in members):
        return False
    finalizing = finalized_key(parent_run_id)  # elected, or still a candidate (killed in the election's settle)
    return (f"{PLAN_ATTR}:{number}" in attrs or ready_key(number) not in attrs
            or any(k == finalizing or k.startswith(f"{finalizing}@") for k in attrs))


def finalized_key(parent_run_id: str) -> str:
    """Study attribute: the worker elected to summarize and register the invocation (tune/study.py ``finish``)."""
    return f"finalized:{parent_run_id}"


def ended_key(inv: Invocation) -> str:
    """Study attribute: the invocation ended (status) while MLflow was unreachable; its runs are still RUNNING there."""
    return f"ended:{inv.parent_run_id}"


def end_left_running(client: MlflowClient, parent_run_id: str, status: str,
                     reason: str = "the MLflow tracking server was unreachable when the study stopped",
                     child_status: str = "FAILED") -> None:
    """End the parent run, and its child runs still RUNNING, of an invocation that ended while the tracking
    server was unreachable (issue 16: its last worker could not tell MLflow, so it told the study), or whose
    workers all died (:func:`abandoned`)."""
    if not _is_running(client, parent_run_id):
        return
    experiment = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "end_reason", reason)
        client.set_terminated(run.info.run_id, status=child_status)
    client.set_tag(parent_run_id, "end_reason", reason)
    client.set_terminated(parent_run_id, status=status)


def _is_running(client: MlflowClient, run_id: str) -> bool:
    """Whether the run is live. A run this store lacks (from another store, or deleted for good) is not; any other
    error is raised: read as "not running", a tracking server's hiccup made a worker start a second invocation
    beside a live one (and end the live one's parent run as abandoned)."""
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise
    return run.info.status == "RUNNING" and run.info.lifecycle_stage == "active"


# --------------------------------------------------------------------------- the study summary


def _figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's plotly figures; importances need two complete trials and are skipped otherwise."""
    from optuna import visualization as vis

    if not study.get_trials(deepcopy=False):  # no search (a budget too short for one): nothing to draw
        return {}

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    figs = {"optimization_history": vis.plot_optimization_history, "parallel_coordinate": vis.plot_parallel_coordinate,
            "slice": vis.plot_slice, "intermediate_values": vis.plot_intermediate_values}
    if complete >= 2:
        figs["param_importances"] = vis.plot_param_importances
    out = {}
    for name, plot in figs.items():
        try:
            out[name] = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. a single distinct value for every param
            print(f"  skipped plot {name}: {e}")
    return out


def summarize(study: optuna.Study, inv: Invocation) -> dict[str, Any]:
    """Log the study summary on the parent run: best trial, counts by state, plots (HTML)."""
    client = MlflowClient()
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    metrics = {f"trials_{s}": counts.get(s, 0) for s in ("complete", "pruned", "fail")}
    metrics["trials_this_invocation"] = inv.finished(study)
    summary: dict[str, Any] = {"counts": dict(counts)}
    tags = [RunTag("trial_counts", json.dumps(dict(counts)))]
    params: list[Param] = []
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:
        metrics["best_val_acc"] = float(best.value)
        tags += [RunTag("best_trial", str(best.number)), RunTag("best_params", json.dumps(best.params))]
        logged = client.get_run(inv.parent_run_id).data.params
        params = [Param(f"best.{k}", str(v)) for k, v in best.params.items() if f"best.{k}" not in logged]
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    now = int(time.time() * 1000)
    client.log_batch(inv.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=params, tags=tags)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in _figures(study).items():
            path = Path(tmp) / f"{name}.html"
            fig.write_html(str(path), include_plotlyjs=True, full_html=True)  # opens offline
            client.log_artifact(inv.parent_run_id, str(path), "optuna")
        trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
        trials.to_csv(Path(tmp) / "trials.csv", index=False)
        client.log_artifact(inv.parent_run_id, str(Path(tmp) / "trials.csv"), "optuna")
    return summary


def end(inv: Invocation, status: str = "FINISHED", reason: str | None = None) -> None:
    """End the parent run; ``reason`` (what interrupted it: SIGTERM, Ctrl-C) goes in its end_reason tag."""
    client = MlflowClient()
    if reason:
        client.set_tag(inv.parent_run_id, "end_reason", reason)
    client.set_terminated(inv.parent_run_id, status=status)
