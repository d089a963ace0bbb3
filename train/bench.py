"""``reslab bench``: training images/s of reslab's pipeline against its ceiling and against the usual way.

Three pipelines train the same model at the same batch size, side by side in one run:

- ceiling: the engine's training step alone, on random tensors already in memory;
- reslab: the real pipeline: :func:`train.engine.make_loader` (cached uint8 data, the dataset's default
  augmentation), :func:`train.engine.prepare_batch` and the engine's :class:`~train.engine.Stepper`
  (bf16 autocast + channels_last where available), i.e. exactly what ``fit`` runs per batch;
- conventional: what most PyTorch CIFAR tutorials do: torchvision ``ImageFolder`` over image files
  extracted from the zip, PIL transforms, a ``DataLoader`` with worker processes, fp32, NCHW. It runs
  in a process of its own, as a tutorial script does: with glibc's allocator defaults, not the
  settings every reslab process applies (:mod:`train.allocator`; ``--conventional-allocator reslab``
  gives it those too). Ceiling and reslab run in the benchmark's process.

The machine is shared and its load drifts, so the pipelines are measured in alternating short windows
(rounds) and the median window is reported. Pipelines that prepare batches in the background (the
conventional DataLoader's worker processes, reslab's albumentations threads) fill their queues while
another pipeline runs: those batches would cost nothing inside their own next window, and their
refill would cost the next pipeline's. So every window starts with untimed steps, as many as the
deepest of these queues holds plus one, and times each pipeline alone in its steady state.

The benchmark also logs the trained model to MLflow (a temporary store unless ``--model-uri`` names
one) and measures evaluation images/s and single-image inference latency of the logged model as a
server would load it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .cli import add_train_args, config_from_args, fail
from .config import TrainConfig
from .data import ImageData, load_dataset, resolve_source, split_validation, spread_sample
from .engine import (
    Runtime,
    batch_augment,
    build_model,
    compile_decision,
    cpu_supports_bf16,
    evaluate,
    make_loader,
    make_stepper,
    prepare_batch,
    resolve_precision,
    select_device,
    training_loss,
)
from .files import output_path, write_text_atomic
from .loader import PREFETCH as BATCHLOADER_PREFETCH
from .machine import cpu_has_flag, cpu_model

PIPELINES = ("ceiling", "reslab", "conventional")
LOADER_PREFETCH = 2  # batches each DataLoader worker prepares ahead: torch's default prefetch_factor


@dataclass
class Pipeline:
    """A training pipeline reduced to ``step()``: fetch one batch, train on it, return the loss."""

    name: str
    description: str
    precision: str
    memory_format: str
    model: nn.Module | None  # None when the pipeline runs in its own process
    step: Callable[[], float]
    params_changed: Callable[[], bool]  # since the pipeline was built
    allocator: str
    close: Callable[[], None] = lambda: None
    windows: list[float] = field(default_factory=list)  # images/s of each timed window
    losses: list[float] = field(default_factory=list)

    def result(self, batch_size: int) -> dict[str, Any]:
        return {
            "description": self.description,
            "precision": self.precision,
            "memory_format": self.memory_format,
            "allocator": self.allocator,
            "images_per_sec": statistics.median(self.windows) if self.windows else float("nan"),
            "windows_images_per_sec": self.windows,
            "steps": len(self.losses),
            "images": len(self.losses) * batch_size,
            "first_loss": self.losses[0] if self.losses else float("nan"),
            "last_loss": self.losses[-1] if self.losses else float("nan"),
        }


def _bench_config(args: argparse.Namespace) -> TrainConfig:
    """The dataset's default training configuration (or a recipe's), with the benchmark's overrides."""
    return dataclasses.replace(config_from_args(args), progress=False)


def _cycle_epochs(epoch_iter: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """Batches of epoch 0, 1, 2, ... without end (the benchmark may outlast one epoch)."""
    for epoch in itertools.count():
        yield from epoch_iter(epoch)


def _to_float(t: torch.Tensor) -> float:
    return float(t.detach().float().cpu())


def _changes(model: nn.Module) -> Callable[[], bool]:
    """A check whether training has changed any parameter since now."""
    before = [q.detach().clone() for q in model.parameters()]
    return lambda: any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------- the three pipelines


def ceiling_pipeline(cfg: TrainConfig, data: ImageData, rt: Runtime, total: int) -> Pipeline:
    """The engine's step alone: a fixed random batch, already normalised, on the device."""
    device, precision = rt.device, rt.precision
    model = rt.place(build_model(cfg, data))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    stepper = make_stepper(cfg, model, total, device, precision)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, data.channels, data.image_size, data.image_size, generator=g)
    x = x.to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, data.num_classes, (cfg.batch_size,), generator=g).to(device)
    model.train()
    return Pipeline("ceiling", "engine step on random in-memory tensors (no loading, no augmentation)", precision,
                    "channels_last" if cfg.channels_last else "NCHW", model, lambda: _to_float(stepper(x, y)[0]),
                    _changes(model), keep_freed_memory())


def reslab_pipeline(cfg: TrainConfig, data: ImageData, rt: Runtime, total: int) -> Pipeline:
    """What ``fit`` runs per batch: BatchLoader -> prepare_batch (crop/flip, normalise) -> Stepper."""
    device, precision = rt.device, rt.precision
    rest, _ = split_validation(data.train_y, cfg.val_fraction, seed=0) if cfg.val_fraction > 0 else (np.arange(len(data.train_y)), None)
    x_train, y_train = data.train_x[rest], data.train_y[rest]
    loader = make_loader(cfg, x_train, y_train, device)
    model = rt.place(build_model(cfg, data))
    stepper = make_stepper(cfg, model, total, device, precision)
    batch_aug = batch_augment(cfg, data.num_classes)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _cycle_epochs(loader.epoch)
    model.train()

    def step() -> float:
        xb, yb = next(batches)
        x, y = prepare_batch(xb, yb, rt, batch_aug, gen)
        return _to_float(stepper(x, y)[0])

    aug = {"crop-flip": f"crop(pad {cfg.crop_pad})+flip, batched", "flip": "flip, batched", "none": "none",
           "album": f"albumentations in {cfg.workers} thread(s) + flip, batched"}[cfg.augment]
    if cfg.crop_size:
        aug += f", {cfg.crop_size}x{cfg.crop_size} crops"
    return Pipeline("reslab", f"BatchLoader (uint8 in memory), {aug}", precision,
                    "channels_last" if cfg.channels_last else "NCHW", model, step, _changes(model), keep_freed_memory(),
                    batches.close)


def extract_images(zip_path: Path, dest: Path, per_class: int) -> int:
    """Extract ``per_class`` train images of every class from a dataset zip into ``dest/train``."""
    with zipfile.ZipFile(zip_path) as zf:
        by_class: dict[str, list[str]] = {}
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) >= 3 and parts[-3] == "train" and not name.endswith("/"):
                by_class.setdefault(parts[-2], []).append(name)
        if not by_class:
            raise ValueError(f"{zip_path}: no train/<class>/<image> members")
        chosen = [n for members in by_class.values() for n in members[:per_class]]
        for name in chosen:
            target = dest / "train" / Path(name).parent.name / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return len(chosen)


def conventional_pipeline(cfg: TrainConfig, data: ImageData, device: torch.device, folder: Path, workers: int,
                          allocator: str) -> Pipeline:
    """The tutorial way: ImageFolder + PIL transforms + DataLoader workers, fp32, NCHW."""
    from torchvision import datasets, transforms

    size = data.image_size
    tfs: list[Any] = [transforms.Grayscale(1)] if data.channels == 1 else []
    tfs += [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(data.mean, data.std)]
    ds = datasets.ImageFolder(str(folder / "train"), transform=transforms.Compose(tfs))
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                     prefetch_factor=LOADER_PREFETCH if workers > 0 else None)
    model = build_model(cfg, data).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    batches = _cycle_epochs(lambda _epoch: iter(dl))
    model.train()

    def step() -> float:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = training_loss(criterion, model(x), y)  # an ensemble's members each learn from their own
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def close() -> None:
        batches.close()
        if getattr(dl, "_iterator", None) is not None:
            dl._iterator._shutdown_workers()  # persistent workers otherwise outlive the benchmark

    return Pipeline("conventional", f"ImageFolder + PIL transforms + DataLoader({workers} worker processes)", "fp32",
                    "NCHW", model, step, _changes(model), allocator, close)


def _serve_conventional(conn: Any, cfg: dict[str, Any], data: ImageData, device: str, folder: str, workers: int,
                        reslab_malloc: bool) -> None:
    """The conventional pipeline's own process: build it, then answer the benchmark's requests."""
    try:
        allocator = keep_freed_memory() if reslab_malloc else "glibc malloc defaults"  # before any tensor
        c = TrainConfig.from_dict(cfg)
        torch.manual_seed(c.seed)
        pipe = conventional_pipeline(c, data, torch.device(device), Path(folder), workers, allocator)
        conn.send(("ok", (pipe.description, pipe.precision, pipe.memory_format, pipe.allocator)))
        while (request := conn.recv()) != "close":
            conn.send(("ok", pipe.step() if request == "step" else pipe.params_changed()))
        pipe.close()
        conn.send(("ok", None))
    except (EOFError, BrokenPipeError):  # the benchmark's process is gone: nobody to answer
        return
    except BaseException:  # noqa: BLE001 (reported to the benchmark's process, which raises it)
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))


def conventional_process(cfg: TrainConfig, data: ImageData, device: torch.device, folder: Path, workers: int,
                         reslab_malloc: bool = False) -> Pipeline:
    """The conventional pipeline in a process of its own, as a tutorial script runs: with glibc's
    allocator defaults, not the settings reslab applies to its own process (train/allocator.py).
    Steps are requested one at a time, so its windows alternate with the others' as before."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's state
    conn, child_conn = ctx.Pipe()
    shape_only = dataclasses.replace(data, train_x=data.train_x[:1], train_y=data.train_y[:1],
                                     test_x=data.test_x[:1], test_y=data.test_y[:1])
    proc = ctx.Process(target=_serve_conventional, name="reslab-bench-conventional",
                       args=(child_conn, cfg.to_dict(), shape_only, str(device), str(folder), workers, reslab_malloc))
    proc.start()
    child_conn.close()

    def ask(request: str | None = None) -> Any:
        if request is not None:
            conn.send(request)
        status, value = conn.recv()
        if status == "error":
            raise RuntimeError(f"the conventional pipeline's process failed:\n{value}")
        return value

    def close() -> None:  # also on the way out of an error or Ctrl-C: never raise over it
        with contextlib.suppress(EOFError, OSError, RuntimeError):
            ask("close")
        proc.join(30)
        if proc.is_alive():
            proc.kill()

    try:
        description, precision, layout, allocator = ask()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"the conventional pipeline's process died (exit code {proc.exitcode})") from None
    return Pipeline("conventional", f"{description}, own process", precision, layout, None, lambda: ask("step"),
                    lambda: ask("changed"), allocator, close)


# --------------------------------------------------------------------------- measurement


def measure(pipes: list[Pipeline], batch_size: int, steps: int, rounds: int, warmup: int, settle: int,
            progress: bool = True) -> None:
    """Warm each pipeline up, then alternate timed windows of ``steps // rounds`` steps between them;
    ``settle`` untimed steps start every window. Rounds cycle through every order of the pipelines, so
    none always runs right after another's background workers refill their queues."""
    per_window = max(1, steps // rounds)
    total = len(pipes) * (warmup + rounds * (settle + per_window))
    bar = tqdm(total=total, desc="benchmark", unit="step", disable=not progress, leave=False)
    for p in pipes:
        for _ in range(warmup):
            p.losses.append(p.step())
            bar.update()
    orders = list(itertools.permutations(pipes))
    for r in range(rounds):
        for p in orders[r % len(orders)]:
            bar.set_postfix_str(p.name)
            for _ in range(settle):
                p.losses.append(p.step())
                bar.update()
            t0 = time.perf_counter()
            for _ in range(per_window):
                p.losses.append(p.step())
                bar.update()
            p.windows.append(per_window * batch_size / (time.perf_counter() - t0))
    bar.close()


def queue_depths(cfg: TrainConfig, loader_workers: int) -> dict[str, int]:
    """Batches each pipeline can have prepared in the background while another one ran."""
    album_threads = cfg.augment == "album" and cfg.workers > 0
    return {"ceiling": 0, "reslab": BATCHLOADER_PREFETCH if album_threads else 0,
            "conventional": loader_workers * LOADER_PREFETCH}


def paired_ratio(a: Pipeline, b: Pipeline) -> float:
    """Median over rounds of a's images/s over b's in the same round, so that load drifts on a shared
    machine cancel out instead of landing on whichever pipeline happened to run during them."""
    return statistics.median(x / y for x, y in zip(a.windows, b.windows))


def serving_metrics(model: nn.Module, data: ImageData, cfg: TrainConfig, rt: Runtime,
                    model_uri: str | None, eval_images: int, latency_calls: int) -> dict[str, Any]:
    """Evaluation images/s (engine path, and the logged model) and single-image latency of the logged model."""
    from .tracking import load_model, log_model, setup_tracking

    n = min(eval_images, len(data.test_y))
    pick = spread_sample(len(data.test_y), n)
    x, y = data.test_x[pick], data.test_y[pick]
    evaluate(model, x[:64], y[:64], rt)  # warm-up
    engine_eval = evaluate(model, x, y, rt)
    out: dict[str, Any] = {"eval_images": n, "engine_eval_images_per_sec": engine_eval.images_per_sec,
                           "engine_eval_precision": rt.precision, "engine_eval_accuracy": engine_eval.accuracy}
    with contextlib.ExitStack() as stack:
        if model_uri is None:  # log the benchmark's model to a throw-away store, as `reslab train` would
            import mlflow

            previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reslab-bench-")))
            setup_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
            stack.callback(lambda: mlflow.set_tracking_uri(previous) if previous else None)
            exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=exp):
                t0 = time.perf_counter()
                model_uri = log_model(model, cfg, data).model_uri
                out["log_model_seconds"] = time.perf_counter() - t0
            out["model_store"] = "temporary"
        else:
            setup_tracking()  # reslab's store (or MLFLOW_TRACKING_URI), not MLflow's own default ./mlflow.db
            out["model_store"] = "given"
        out["model_uri"] = model_uri
        t0 = time.perf_counter()
        served = load_model(model_uri)
        out["load_model_seconds"] = time.perf_counter() - t0
        # what the logged model takes, from its own metadata (a given model may be an imported one with ImageNet
        # statistics, or of another input size): float32 NCHW at its size, normalised as it was trained
        from .evaluate import check_compatible, model_inputs
        from .usemodel import open_model

        opened = open_model(model_uri)
        check_compatible(opened, data)

        def prep(images: np.ndarray) -> torch.Tensor:
            return opened.prep.tensor(model_inputs(opened, images))

        with torch.inference_mode():
            served(prep(x[:2]))
            t0 = time.perf_counter()
            preds = torch.cat([served(prep(x[i : i + 500])).argmax(1) for i in range(0, n, 500)])
            out["served_eval_images_per_sec"] = n / (time.perf_counter() - t0)
            out["served_eval_accuracy"] = float((preds.numpy() == y).mean())
            if out["model_store"] == "temporary":  # the logged model is the benchmark's own: same top-1 as the
                # engine (up to near-ties between the engine's bf16 and the served fp32); a given one is another network
                out["served_top1_agreement"] = float((preds.numpy() == engine_eval.preds).mean())
            lat = []
            for i in range(latency_calls + 5):
                img = x[i % n : i % n + 1]
                t0 = time.perf_counter()
                served(prep(img)).softmax(1)
                if i >= 5:  # the first calls pay one-off allocations
                    lat.append((time.perf_counter() - t0) * 1000)
        out["latency_ms_p50"] = float(np.percentile(lat, 50))
        out["latency_ms_p95"] = float(np.percentile(lat, 95))
        out["latency_calls"] = len(lat)
        out["served_precision"] = "fp32"
    return out


# --------------------------------------------------------------------------- the command


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_bf16(),
            "cpu_amx": cpu_has_flag("amx_bf16"), "torch": torch.__version__,
            "device": str(device), "load_average_1min": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Build the three pipelines, measure them side by side, then the serving numbers."""
    t_start = time.perf_counter()
    cfg = _bench_config(args)
    try:
        device = select_device(cfg.device)
    except RuntimeError as e:  # no such device here: the user's choice, one line
        raise ValueError(str(e)) from e
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    progress = args.progress is not False  # `--no-progress` turns the bars off
    data = load_dataset(cfg.dataset, cfg.data, cfg.download, progress=progress)
    rt = Runtime.create(cfg, data)
    # compile as a training run with this configuration would (auto: by the length of that run)
    # (its images: --subset's, else the whole training split; the benchmark's batches come from all of it)
    images = min(cfg.subset or len(data.train_y), len(data.train_y))
    train_steps = cfg.max_steps or cfg.epochs * (round(images * (1 - cfg.val_fraction)) // cfg.batch_size)
    compiled, compile_reason = compile_decision(cfg, device, precision, train_steps)
    cfg = dataclasses.replace(cfg, compile=compiled)
    if compiled:
        from .compiled import batchnorm_note

        compile_reason = f"{compile_reason}; {batchnorm_note(device)}"
    selected = [p for p in PIPELINES if p in args.pipelines]
    depths = queue_depths(cfg, args.loader_workers)
    settle = args.settle if args.settle is not None else max(depths[p] for p in selected) + 1
    total = args.warmup_steps + args.rounds * (settle + max(1, args.steps // args.rounds))  # sizes the lr schedules
    kind, src = ("cifar-batches", data.source) if cfg.download and cfg.data is None else resolve_source(cfg.dataset, cfg.data)
    if "conventional" in selected and kind != "zip":
        raise ValueError(f"the conventional pipeline reads image files from the dataset zip; {src} is a {kind}")
    pipes: list[Pipeline] = []
    with tempfile.TemporaryDirectory(prefix="reslab-bench-images-") as tmp:
        try:
            if "ceiling" in selected:
                pipes.append(ceiling_pipeline(cfg, data, rt, total))
            if "reslab" in selected:
                pipes.append(reslab_pipeline(cfg, data, rt, total))
            if "conventional" in selected:
                per_class = -(-cfg.batch_size * (total + 2) // data.num_classes)
                t0 = time.perf_counter()
                n_files = extract_images(src, Path(tmp), per_class)
                extract_s = time.perf_counter() - t0
                pipes.append(conventional_process(cfg, data, device, Path(tmp), args.loader_workers,
                                                  args.conventional_allocator == "reslab"))
            measure(pipes, cfg.batch_size, args.steps, args.rounds, args.warmup_steps, settle, progress)
            pipelines = {}
            for p in pipes:  # before close(): a pipeline in its own process answers until then
                r = p.result(cfg.batch_size)
                r["params_changed"] = p.params_changed()
                r["loss_finite"] = bool(np.isfinite(p.losses).all())
                pipelines[p.name] = r
        finally:
            for p in pipes:
                p.close()
    if "conventional" in pipelines:
        pipelines["conventional"].update(extracted_images=n_files, extract_seconds=extract_s)
    by_name = {p.name: p for p in pipes}
    ratios = {}
    if {"reslab", "ceiling"} <= by_name.keys():
        ratios["reslab_over_ceiling"] = paired_ratio(by_name["reslab"], by_name["ceiling"])
    if {"reslab", "conventional"} <= by_name.keys():
        ratios["reslab_over_conventional"] = paired_ratio(by_name["reslab"], by_name["conventional"])
    serving = None
    if not args.no_serving and any(p.name == "reslab" for p in pipes):
        model = next(p.model for p in pipes if p.name == "reslab").eval()
        serving = serving_metrics(model, data, cfg, rt, args.model_uri, args.eval_images, args.latency_calls)
    return {
        "dataset": cfg.dataset, "recipe": args.recipe, "model": cfg.model, "model_args": cfg.model_args, "batch_size": cfg.batch_size,
        "precision": precision, "augment": cfg.augment, "compile": cfg.compile, "compile_reason": compile_reason,
        "device": str(device),
        "steps_per_pipeline": args.steps, "rounds": args.rounds, "warmup_steps": args.warmup_steps,
        "settle_steps": settle, "queue_depths": {p: depths[p] for p in selected},
        "pipelines": pipelines, "ratios": ratios, "serving": serving,
        "machine": machine_info(device), "seconds": time.perf_counter() - t_start,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def targets(res: dict[str, Any]) -> tuple[float | None, float | None]:
    """The targets a run is read against (issue 17, set for a 2-core CPU): the pipeline at 0.95x its own step's
    ceiling; against the conventional pipeline 2.5x eager and 3.0x compiled on a bf16 CPU, 1.7x on a CPU without
    bf16 (fp32 only). A run in fp32 is read as one on such a CPU, whatever the CPU offers (`--precision fp32`
    on a bf16 CPU runs the step the 1.7x was set for). None on a GPU, for which no target was set."""
    if res.get("device", "cpu") != "cpu":
        return None, None
    if not res["machine"]["cpu_bf16"] or res["precision"] == "fp32":
        return 0.95, 1.7
    return 0.95, 3.0 if res["compile"] else 2.5


def format_table(res: dict[str, Any]) -> str:
    """The human-readable report: one row per pipeline, then the ratios and the serving numbers."""
    m = res["machine"]
    margs = "(" + ", ".join(f"{k}={v}" for k, v in res["model_args"].items()) + ")" if res["model_args"] else ""
    lines = [f"reslab bench: {res['model']}{margs} on {res['dataset']}, batch {res['batch_size']}, {res['device']} "
             f"({m['cpu']}, {m['cores']} cores, bf16 {'yes' if m['cpu_bf16'] else 'no'}, AMX {'yes' if m.get('cpu_amx') else 'no'}), "
             f"{res['rounds']} rounds x {res['steps_per_pipeline'] // res['rounds']} timed steps "
             f"(each after {res['settle_steps']} untimed); step {'compiled' if res['compile'] else 'eager'} "
             f"({res['compile_reason']})",
             "",
             f"{'pipeline':<13} {'images/s':>9} {'vs ceiling':>10} {'precision':>9} {'layout':>13}  what",
             f"{'-' * 13} {'-' * 9} {'-' * 10} {'-' * 9} {'-' * 13}  {'-' * 40}"]
    ceiling = res["pipelines"].get("ceiling", {}).get("windows_images_per_sec")
    for name, p in res["pipelines"].items():  # paired per round, then the median, as the ratios below
        rel = f"{statistics.median(a / b for a, b in zip(p['windows_images_per_sec'], ceiling)):.2f}x" if ceiling else "-"
        lines.append(f"{name:<13} {p['images_per_sec']:>9.1f} {rel:>10} {p['precision']:>9} {p['memory_format']:>13}  {p['description']}")
    lines.append("")
    r = res["ratios"]
    ceiling_target, conventional_target = targets(res)
    if "reslab_over_ceiling" in r:
        lines.append(f"reslab / ceiling      = {r['reslab_over_ceiling']:.2f}  ("
                     + (f"target >= {ceiling_target}; " if ceiling_target else "no target on this device; ")
                     + "median of per-round ratios)")
    if "reslab_over_conventional" in r:
        lines.append(f"reslab / conventional = {r['reslab_over_conventional']:.2f}  ("
                     + (f"target >= {conventional_target}; " if conventional_target else "no target on this device; ")
                     + "median of per-round ratios)")
    s = res.get("serving")
    if s:
        lines += ["", f"evaluation: {s['engine_eval_images_per_sec']:.0f} images/s (engine, {s['engine_eval_precision']}), "
                  f"{s['served_eval_images_per_sec']:.0f} images/s (logged model, fp32) over {s['eval_images']} test images",
                  f"single-image latency of the logged model: p50 {s['latency_ms_p50']:.2f} ms, p95 {s['latency_ms_p95']:.2f} ms "
                  f"({s['latency_calls']} calls)"]
    lines.append(f"load average (1 min) at the end: {m['load_average_1min']:.2f}; total {res['seconds']:.0f} s")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.rounds < 1 or args.warmup_steps < 0:
        fail(f"--rounds takes 1 or more and --warmup-steps 0 or more (here {args.rounds} and {args.warmup_steps})")
    if args.steps < args.rounds:
        fail(f"--steps {args.steps} must be at least --rounds {args.rounds}")
    if args.latency_calls < 1 or args.eval_images < 1:  # were an IndexError after the whole benchmark, nothing saved
        fail(f"--latency-calls and --eval-images take 1 or more (here {args.latency_calls} and {args.eval_images}); "
             "--no-serving skips that part")
    unknown = set(args.pipelines) - set(PIPELINES)
    if unknown:
        fail(f"unknown pipeline(s) {', '.join(sorted(unknown))}; choose from {', '.join(PIPELINES)}")
    if args.out:
        output_path(args.out)  # a folder or an unwritable place, before minutes of measuring, not after
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the table, not download bars
    res = run_bench(args)
    show_and_save(format_table(res), res, args.out)


def show_and_save(table: str, res: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's table and write its whole result as JSON (docs/results/ takes these files as they are)."""
    print(table)
    if out:
        path = Path(out)  # checked at the start (output_path): the folder is there
        write_text_atomic(path, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="training images/s: reslab's pipeline vs its ceiling vs the conventional way",
        description="Measure, side by side in one run, the training throughput of the same model, batch size "
        "and precision three ways (ceiling: the step alone on random in-memory tensors; reslab: the real pipeline; "
        "conventional: ImageFolder + PIL transforms + DataLoader workers, fp32, NCHW, in a process of its own), "
        "alternating short windows "
        "between them; then evaluation images/s and single-image latency of a logged model. Prints a table and "
        "writes JSON with --out. The training flags are `reslab train`'s: the benchmark measures the step such "
        "a run would take (model, batch size, precision, augmentation, compile, recipe).",
    )
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=40, help="timed training steps per pipeline, split over the rounds (default: 40)")
    g.add_argument("--rounds", type=int, default=8, help="alternating measurement windows per pipeline (default: 8)")
    g.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per pipeline before the first round (default: 3)")
    g.add_argument("--settle", type=int, help="untimed steps at the start of every window (default: the deepest "
                   "background batch queue of the pipelines plus one, so that each window times a steady state)")
    g.add_argument("--loader-workers", type=int, default=min(4, os.cpu_count() or 2),
                   help="DataLoader worker processes of the conventional pipeline (default: up to 4, one per core)")
    g.add_argument("--conventional-allocator", choices=["default", "reslab"], default="default",
                   help="malloc settings of the conventional pipeline's process: glibc's defaults, as a tutorial "
                   "script runs, or the ones reslab applies to its own processes (default: default)")
    g.add_argument("--pipelines", nargs="+", default=list(PIPELINES), metavar="NAME",
                   help=f"subset of {', '.join(PIPELINES)} (default: all)")
    g.add_argument("--model-uri", help="logged model for the evaluation/latency numbers (default: log the benchmark's model to a temporary store)")
    g.add_argument("--eval-images", type=int, default=2000, help="test images for evaluation images/s (default: 2000)")
    g.add_argument("--latency-calls", type=int, default=100, help="single-image calls for the latency percentiles (default: 100)")
    g.add_argument("--no-serving", action="store_true", help="skip the evaluation and latency measurements")
    g.add_argument("--out", metavar="FILE.json", help="write the full results as JSON")
    add_train_args(p)
    p.set_defaults(func=cmd_bench)
