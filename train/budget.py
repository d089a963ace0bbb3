"""Time budgets: a run's length in wall-clock seconds, not epochs.

The same command runs on CPUs that differ 4x in speed (AVX-512 BF16 or AVX2 only) and on GPUs,
so a schedule sized in epochs on one machine is wrong on the others. A budgeted run measures its
own step time as it trains and sets the length of its one-cycle schedule (the *horizon*) so that
training, the per-epoch validation and the final evaluation end within the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Forward-only evaluation costs about a third of a training step per image (no backward, no update).
EVAL_COST_PER_TRAIN_IMAGE = 0.35
CALIBRATION_SKIP = 2  # the first steps pay for allocation and kernel selection: not timed
CALIBRATION_STEPS = 8  # timed steps before the first plan
CALIBRATION_MIN_STEPS = 3  # a time-limited measurement still times this many (its median needs three)
NARROWEST_WIDTH = 16  # a budget narrows a network (--min-budget-epochs; make run's short refits) down to this width
REPLANS_PER_EPOCH = 10  # the plan is renewed this often within an epoch (long epochs: slow nets, big data)...
REPLAN_MIN_STEPS = 20  # ...but over no fewer steps than this, so that one slow step does not swing it...
FINAL_REPLAN_STEPS = 5  # ...except in the last stretch (fewer steps left than between plans): every 5 steps, still
# timed over the latest 20 or more, so that a slowdown there is not found only after the budget is spent


def parse_duration(text: str | float | int) -> float:
    """Seconds from 7200, '90s', '30m', '2h' or '1h30m'."""
    if isinstance(text, (int, float)):
        return float(text)
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"duration {text!r}: expected seconds or a duration like 90s, 30m, 2h, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Horizon:
    """The schedule's length in optimizer steps; the lr schedule reads it at every step, so a budget
    can set it once the step time is known."""

    total: int


@dataclass
class TimeBudget:
    """Plans the horizon of a run of ``seconds`` from measured step and evaluation times."""

    seconds: float
    steps_per_epoch: int
    batch_size: int
    val_images: int  # evaluated after every epoch
    final_images: int  # evaluated once at the end (validation and/or test)
    eval_views: int = 1  # forward passes per evaluated image (test-time augmentation: config.TTA_VIEWS)
    max_steps: int | None = None  # --max-steps as well: the budget plans at most this many steps
    eval_pixels: float = 1.0  # an evaluated image's pixels over a trained one's: (48/40)^2 for FER-2013's 40-px crops

    def eval_seconds(self, images: int, seconds_per_step: float) -> float:
        """An estimate of evaluating ``images`` from the training step time (until one is measured)."""
        per_image = (seconds_per_step / max(1, self.batch_size) * EVAL_COST_PER_TRAIN_IMAGE * self.eval_views
                     * self.eval_pixels)
        return images * per_image

    def evaluation_warning(self, seconds_per_step: float) -> str | None:
        """A line for the user when the final evaluation alone is expected to take most of the budget (TTA views
        over a large test split on a slow CPU): the schedule that is left is then too short to learn anything."""
        final = self.eval_seconds(self.final_images, seconds_per_step)
        if final < 0.5 * self.seconds:
            return None
        return (f"the final evaluation ({self.final_images:,} images x {self.eval_views} view(s)) is estimated at "
                f"{format_duration(final)} of the {format_duration(self.seconds)} budget at this machine's speed, which "
                f"leaves training {format_duration(max(0.0, self.seconds - final))} at most: give a longer budget, or "
                "fewer test-time views (--tta 0 or 1)")

    def plan(self, step: int, wall_seconds: float, seconds_per_step: float,
             val_seconds_per_epoch: float | None = None) -> int:
        """The horizon (total steps) that ends the run at the budget, given where it stands now. Once a validation
        has been timed, the final evaluation is sized from it (the same network, views and image size), not from
        the training step."""
        if val_seconds_per_epoch is not None and self.val_images:
            val = val_seconds_per_epoch
            final = val_seconds_per_epoch * self.final_images / self.val_images
        else:
            val = self.eval_seconds(self.val_images, seconds_per_step)
            final = self.eval_seconds(self.final_images, seconds_per_step)
        per_step = seconds_per_step + val / max(1, self.steps_per_epoch)
        left = self.seconds - wall_seconds - final
        total = max(step, 1, step + int(left / max(per_step, 1e-9)))
        return total if self.max_steps is None else max(step, min(total, self.max_steps))
