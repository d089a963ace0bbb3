"""One tracked training run: data -> fit -> MLflow (the body of ``reslab train``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow

from .config import TrainConfig
from .data import load_dataset
from .distributed import is_main_process
from .engine import fit, fit_width, load_checkpoint, resolve_precision, select_device
from .interrupt import END_REASON_TAG, end_reason, raise_if_terminated
from .redact import mask_secrets
from .tracking import (
    epoch_logger,
    experiment_id,
    flat_params,
    log_fit,
    model_files,
    promote,
    register_model,
    run_tags,
    setup_tracking,
)


def train_and_log(
    cfg: TrainConfig,
    experiment: str | None = None,
    run_name: str | None = None,
    register: str | None = None,
    resume: str | None = None,
    init_from: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` inside an MLflow run (a new one, or the interrupted one on resume); ``tags`` are set on a
    new run only (e.g. the command line that started it)."""
    if not is_main_process():  # a DDP worker other than rank 0: train its shard, log nothing
        data = load_dataset(cfg.dataset, cfg.data, cfg.download, progress=False)
        return {"result": fit(cfg, data, [], resume=resume)}  # DDP copies rank 0's weights (init_from)
    setup_tracking()  # fails fast on a bad store, before any data is decoded
    data = load_dataset(cfg.dataset, cfg.data, cfg.download, progress=cfg.progress)
    if init_from:
        cfg.pretrained = str(model_files(init_from)[1])
    if resume and run_id is None:
        run_id = load_checkpoint(resume).get("meta", {}).get("mlflow_run_id")
    device = select_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id(experiment or cfg.dataset), run_name=run_name) as run:
        print(f"MLflow run {run.info.run_id} in {mask_secrets(mlflow.get_tracking_uri())}")
        try:
            # a budget that buys too few epochs at the model's width narrows it, before the parameters say the width;
            # in the run (its wall time covers the measuring, which the budget counts) and not on resume (the
            # checkpoint holds the width)
            started = time.perf_counter()
            cfg, narrowed = (cfg, None) if resume else fit_width(cfg, data)
            spent = time.perf_counter() - started
            if narrowed:
                print(narrowed, flush=True)
            if run_id is None:
                mlflow.log_params(flat_params(cfg))
                mlflow.set_tags({**run_tags(cfg, data, str(device), precision), **(tags or {})})
                if init_from:
                    mlflow.set_tag("init_from", init_from)
                if narrowed:
                    mlflow.set_tag("budget_width", narrowed)
            if resume:  # killed between checkpoint and logging: log the checkpointed epochs MLflow missed
                logged_steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")}
                for h in load_checkpoint(resume)["history"]:
                    if h["epoch"] not in logged_steps:
                        epoch_logger(int(h["epoch"]) - 1, h)
            result = fit(cfg, data, [epoch_logger], resume=resume,
                         meta={"mlflow_run_id": run.info.run_id, "run_name": run_name}, spent=spent)
            raise_if_terminated()  # a SIGTERM dropped during the final evaluation
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (train/interrupt.py): KILLED, with the reason
            mlflow.set_tag(END_REASON_TAG, end_reason(e))
            mlflow.end_run("KILLED")
            if cfg.checkpoint_dir and (Path(cfg.checkpoint_dir) / "last.pt").exists():
                print(f"\nresume with: reslab train --resume {cfg.checkpoint_dir}", flush=True)
            raise
        mlflow.set_tag("compile", result.extra["compile"])  # whether the step was compiled, and why
        logged = log_fit(result, data)
        out: dict[str, Any] = {"run_id": run.info.run_id, "result": result, **logged}
        if register:
            test_acc = logged["summary"].get("test_acc", float("nan"))
            mv = register_model(logged["model_info"].model_uri, register, tags={
                "run_id": run.info.run_id, "model": cfg.model, "dataset": cfg.dataset,
                "val_acc": logged["summary"].get("final_val_acc", ""), "test_acc": test_acc,
                "model_epoch": int(logged["summary"]["model_epoch"]),
                "lr": cfg.lr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
            })
            out.update(version=mv.version, alias=promote(register, mv.version, test_acc))
    s = logged["summary"]
    members = int(cfg.model_args.get("ensemble", 1))
    what = f"an ensemble of {members} {cfg.model}" if members > 1 else cfg.model
    lines = [f"trained {what} on {cfg.dataset} in {result.train_seconds:.0f} s ({result.images_per_sec:.0f} img/s, {result.device}, {result.precision})"]
    if "stopped_epoch" in s:
        lines.append(f"stopped early after epoch {s['stopped_epoch']:.0f}: no better validation accuracy for "
                     f"{cfg.patience} epochs")
    if cfg.restore_best and "best_epoch" in s:
        lines.append(f"kept the weights of epoch {s['model_epoch']:.0f} of {result.config.epochs}, the best on validation")
    if "final_val_acc" in s:
        lines.append(f"validation accuracy {s['final_val_acc']:.4f}")
    if "test_acc" in s:
        parts = ", ".join(f"{part} {m['accuracy']:.4f}" for part, m in logged["report"].get("parts", {}).items())
        lines.append(f"test accuracy {s['test_acc']:.4f}, macro F1 {s['test_f1_macro']:.4f}" + (f" ({parts})" if parts else ""))
    if register:
        lines.append(f"registered {register} version {out['version']} (alias: {out['alias']})")
    print("\n".join(lines))
    return out
