"""How ``reslab tune --budget`` spends wall-clock minutes: search at low fidelity, refit, test.

1. **Measure.** A few training steps of the base configuration give this machine's images/s
   (a bf16 CPU, an AVX2-only CPU and a GPU differ by 4x and more; nothing is sized in epochs
   measured elsewhere).
2. **Search** (``SEARCH_SHARE`` of the budget). Every trial trains the base recipe on a stratified
   subset for a few epochs, sized so that ``FULL_TRIALS`` trials run to the end within the search
   time; successive halving (ASHA) stops most trials after their first epoch and promotes the best
   third at each rung (epochs 1, 3, 9, ...), so several times as many configurations are tried.
   A search too short for ``FULL_TRIALS`` trials of the smallest useful size (``MIN_TRIAL_EPOCHS``
   epochs of ``MIN_TRIAL_IMAGES``: an AVX2-only CPU, a budget of a few minutes) is not run at all:
   its trials would rank configurations on noise, so the refit of the base configuration gets the
   whole budget instead (``min_trials`` lowers that bar; below one trial's length, trials get fewer
   epochs, down to one, rather than eat the refit's time). A search whose recipe trial (a new study's first;
   otherwise, or when that one is pruned or fails, the first complete trial) ends no better than always answering the majority class
   (``CHANCE_MARGIN``) is stopped there in every worker, and the refit gets its time: at that fidelity
   the trials learn nothing, so they could only rank noise (``--min-search-trials 0`` keeps searching).
3. **Refit** (what is left, less ``FINISH_RESERVE``). The best configuration is retrained on all
   training images (train + validation) under a time budget, so its one-cycle schedule ends on time,
   then evaluated once on the test split and registered. Without a search, a refit whose time buys fewer
   than ``MIN_REFIT_EPOCHS`` epochs of the base network trains it at half the width (``short_refit``):
   on an AVX2-only CPU ResNet-9 at width 16 trained ~5 epochs of FER-2013 where width 32 trained ~2.2,
   and scored 62.8-63.0% against 51.2-57.5%.

On a fast machine the same rules give bigger subsets, more epochs per trial (up to the recipe's)
and a longer refit: the budget, not the device, sets the length.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from train.budget import EVAL_COST_PER_TRAIN_IMAGE, NARROWEST_WIDTH, format_duration
from train.config import TTA_VIEWS, TrainConfig
from train.models import model_width

SEARCH_SHARE = 0.25  # of the whole budget; the refit gets the rest (docs/tuning.md: why)
MEASURE_SHARE = 0.02  # of the whole budget, at most, for timing the machine (past its first few steps)
FULL_TRIALS = 3  # trials that could run to their last epoch within the search time
MIN_TRIAL_EPOCHS = 3  # successive halving needs rungs: epoch 1, then 3
MIN_TRIAL_IMAGES = 4000  # below this a trial says little about the full-data run
TRIAL_VAL_IMAGES = 1500  # validation images per trial (the selection's noise: ~1.2 points)
TRIAL_OVERHEAD = 3.0  # seconds per trial outside training: model build, MLflow run, weights
FINISH_RESERVE = 15.0  # seconds kept for exporting and registering the champion (took ~2 s on a bf16 CPU)
MIN_REFIT = 20.0  # a refit always gets at least this long, even when the search ran late
MIN_REFIT_EPOCHS = 4  # a no-search refit that buys fewer epochs at the base's width trains at half of it
# A trial of the recipe itself that ends within this of the majority class's share learnt nothing at the
# search's fidelity (~3 standard errors of a 1,500-image validation at 25%): its trials would rank noise.
CHANCE_MARGIN = 0.03


@dataclass
class BudgetPlan:
    seconds: float  # the whole invocation: search + refit + test + registration
    deadline: float  # unix time at which it should end
    images_per_sec: float  # measured at the start
    search_seconds: float
    trial_subset: int | None  # stratified subset of train for every trial (None: all of it)
    trial_epochs: int
    trial_val_fraction: float
    trial_seconds: float  # estimated length of a trial that is never pruned
    batch_size_searched: bool = True  # False: trials too short to rank batch sizes; the recipe's is pinned
    search: bool = True  # False: too short for min_trials trials of the smallest useful size; refit the base only
    search_needs: float = 0.0  # seconds of search that min_trials trials of that size take here
    min_trials: int = FULL_TRIALS

    def trial_config(self, base: TrainConfig) -> TrainConfig:
        """The low-fidelity trial: the base recipe on the subset, for ``trial_epochs``."""
        return dataclasses.replace(base, subset=self.trial_subset, epochs=self.trial_epochs,
                                   val_fraction=self.trial_val_fraction, time_budget=None, max_steps=None)

    def search_timeout(self, now: float | None = None, first: bool = True) -> float:
        """Seconds from ``now`` until no new trial starts (half a trial early: the last one finishes). The
        invocation's creator (``first``) gets one trial at least; a worker that joins after that point gets 0
        and starts none, since its trial would run into the refit's time."""
        now = time.time() if now is None else now
        start = self.deadline - self.seconds
        return max(1.0 if first else 0.0, start + self.search_seconds - 0.5 * self.trial_seconds - now)

    def refit_seconds(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return max(MIN_REFIT, self.deadline - now - FINISH_RESERVE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if not self.search:
            return (f"budget {format_duration(self.seconds)} at {self.images_per_sec:.0f} img/s measured: too short to "
                    f"search ({self.min_trials} trials of the smallest useful size take {format_duration(self.search_needs)} "
                    f"here; a budget of {format_duration(60 * math.ceil(self.search_needs / SEARCH_SHARE / 60))} or more searches), so the base "
                    "configuration is refit on all training images for the whole budget, then tested")
        subset = "all" if self.trial_subset is None else f"{self.trial_subset:,}"
        return (f"budget {format_duration(self.seconds)} at {self.images_per_sec:.0f} img/s measured: search "
                f"{format_duration(self.search_seconds)} (trials of {subset} images x {self.trial_epochs} epochs, "
                f"~{self.trial_seconds:.0f} s unpruned"
                + ("" if self.batch_size_searched else ", below full fidelity")
                + "), then refit on all training images and test")


def short_refit(base: TrainConfig, images_per_sec: float, seconds: float,
                train_images: int) -> tuple[TrainConfig, str] | None:
    """A narrower network, and why, for a no-search refit too short for ``MIN_REFIT_EPOCHS`` epochs of the base
    at the speed measured for it (an AVX2-only CPU, a budget of minutes): half the width, down to ``NARROWEST_WIDTH``,
    costs about half the time per image, so it trains twice the epochs; None to keep the base."""
    width = model_width(base.model, base.model_args)
    epochs = images_per_sec * seconds / max(1, train_images)
    if width is None or width <= NARROWEST_WIDTH or epochs >= MIN_REFIT_EPOCHS:
        return None
    narrow = max(NARROWEST_WIDTH, width // 2)
    why = (f"{format_duration(seconds)} trains {base.model} at width {width} for ~{epochs:.1f} epochs here "
           f"(under {MIN_REFIT_EPOCHS}): the refit trains width {narrow} instead")
    return dataclasses.replace(base, model_args={**base.model_args, "width": narrow}), why


def plan_budget(seconds: float, images_per_sec: float, train_images: int, base: TrainConfig,
                started: float | None = None, min_trials: int = FULL_TRIALS) -> BudgetPlan:
    """Size the search's trials and the refit for ``seconds`` on a machine training ``images_per_sec``;
    no search when fewer than ``min_trials`` trials of the smallest useful size fit in it."""
    if seconds <= 0:
        raise ValueError("the tuning budget must be above 0 seconds")
    started = time.time() if started is None else started
    search = SEARCH_SHARE * seconds
    eval_factor = EVAL_COST_PER_TRAIN_IMAGE * TTA_VIEWS[int(base.tta)]
    val = min(TRIAL_VAL_IMAGES, train_images // 5)  # small data (tests, a user's own folder): a fifth
    usable = train_images - val
    smallest = TRIAL_OVERHEAD + MIN_TRIAL_EPOCHS * (min(usable, MIN_TRIAL_IMAGES) + val * eval_factor) / images_per_sec
    per_trial = max(1.0, search / FULL_TRIALS - TRIAL_OVERHEAD)
    # images one unpruned trial can train in that time, its per-epoch validation included
    trainable = images_per_sec * per_trial - val * eval_factor * MIN_TRIAL_EPOCHS
    epochs = MIN_TRIAL_EPOCHS
    train_part = min(usable, max(MIN_TRIAL_IMAGES, int(trainable / epochs)))
    epoch_seconds = (train_part + val * eval_factor) / images_per_sec
    if train_part >= usable:  # the whole split fits: spend the rest on epochs, up to the recipe's
        epochs = max(MIN_TRIAL_EPOCHS, min(max(base.epochs, MIN_TRIAL_EPOCHS), int(trainable / usable)))
    if TRIAL_OVERHEAD + epochs * epoch_seconds > search:  # not even one trial fits (a slow CPU, a tiny
        # budget): fewer epochs, down to one, rather than a first trial that eats the refit's time
        epochs = max(1, int((search - TRIAL_OVERHEAD) / epoch_seconds))
    subset = train_part + val
    trial_seconds = TRIAL_OVERHEAD + epochs * epoch_seconds
    full_fidelity = train_part >= usable and epochs >= base.epochs  # a trial is the recipe's whole run
    return BudgetPlan(seconds, started + seconds, images_per_sec, search,
                      None if subset >= train_images else subset, epochs, round(val / subset, 4),
                      math.ceil(trial_seconds), batch_size_searched=full_fidelity,
                      search=min_trials * smallest <= search, search_needs=round(min_trials * smallest, 1),
                      min_trials=min_trials)


def majority_share(labels: Any) -> tuple[int, float]:
    """(class, share) of the most frequent label: the accuracy of always answering it, which a stratified
    validation split shares."""
    import numpy as np

    counts = np.bincount(np.asarray(labels))
    return int(counts.argmax()), float(counts.max() / counts.sum())


def learnt_nothing(val_acc: float, majority: float) -> bool:
    """Whether a trial's validation accuracy is no better than always answering the majority class."""
    return val_acc <= majority + CHANCE_MARGIN
