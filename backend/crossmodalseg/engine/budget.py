"""How long a training runs and how far along it is.

A budget is a number of epochs or a wall-clock limit. A wall-clock limit (`--minutes`) bounds the whole run: it
counts from the moment the run started (the process start for the CLI, so imports and preprocessing are inside it),
and training stops early enough to leave time for what follows it (the last validation, the last checkpoint and the
model folder), whose cost is measured as the run goes. Progress in [0, 1] drives the learning-rate schedule and the
methods' ramps: the fraction of iterations done, or of the training time spent.
"""

from __future__ import annotations

import math
import os
import time

from ..errors import UserError

SAFETY_S = 1.0  # slack for the process exit and whatever is not measured


def process_start_time() -> float:
    """Wall-clock time (time.time()) at which this process started; now, where that cannot be read."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # noqa: BLE001 - psutil missing or the platform refuses: count from now
        return time.time()


class Budget:
    """Epoch or wall-clock budget of one training run.

    `epochs`: train exactly that many epochs (progress = iterations done / iterations planned).
    `minutes`: stop when the next iteration would not leave `reserve_s` before the deadline (progress = training
    seconds spent / training seconds available). Both given: whichever ends first.
    `elapsed_before_s` is the training time of an interrupted run that is resumed; it counts against `minutes`.
    """

    def __init__(self, epochs: int | None, minutes: float | None, iterations_per_epoch: int,
                 started_at: float | None = None, elapsed_before_s: float = 0.0):
        if epochs is None and minutes is None:
            raise UserError("a budget needs epochs or minutes")
        self.epochs, self.minutes = epochs, minutes
        self.iterations_per_epoch = iterations_per_epoch
        self.started_at = time.time() if started_at is None else started_at
        self.elapsed_before_s = elapsed_before_s
        self.deadline = (self.started_at + minutes * 60 - elapsed_before_s) if minutes is not None else math.inf
        self.training_started: float | None = None
        self.step_s = 0.0  # running mean of one iteration's seconds
        self.after_training_s = 2.0  # measured cost of the last validation + saving, estimated until measured

    # ---- measurements ------------------------------------------------------------------------------------------
    def start_training(self) -> None:
        self.training_started = time.time()

    def record_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s == 0 else 0.9 * self.step_s + 0.1 * seconds

    def record_after_training(self, seconds: float) -> None:
        """The cost of what runs after the last iteration (validation + checkpoint + model folder), as measured
        by doing it once during training."""
        self.after_training_s = max(self.after_training_s * 0.5, seconds)

    # ---- decisions ---------------------------------------------------------------------------------------------
    @property
    def timed(self) -> bool:
        return self.minutes is not None

    @property
    def total_iterations(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.iterations_per_epoch

    def training_seconds(self) -> float:
        """Seconds of training this run may spend in all (before the reserve for what follows training)."""
        assert self.training_started is not None
        return max(self.deadline - self.after_training_s - SAFETY_S - self.training_started, 1e-6)

    def progress(self, iteration: int) -> float:
        """Fraction of the budget spent before `iteration` (0-based, counted over the whole run)."""
        fractions = []
        if self.total_iterations:
            fractions.append(iteration / self.total_iterations)
        if self.timed and self.training_started is not None:
            fractions.append((time.time() - self.training_started) / self.training_seconds())
        return min(max(fractions, default=0.0), 1.0)

    def exhausted(self, iteration: int) -> bool:
        """True when no further iteration fits: the planned epochs are done, or one more step would eat into the
        time reserved for the last validation and saving."""
        if self.total_iterations is not None and iteration >= self.total_iterations:
            return True
        if self.timed:
            return time.time() + self.step_s + self.after_training_s + SAFETY_S > self.deadline
        return False

    def remaining_s(self) -> float | None:
        return None if not self.timed else max(self.deadline - time.time(), 0.0)

    def estimated_epochs(self, iteration: int) -> int:
        """Epochs the run will have when it ends (for progress displays)."""
        if not self.timed:
            return self.epochs or 0
        per_epoch = self.step_s * self.iterations_per_epoch
        more = 0 if per_epoch <= 0 else int(max(self.deadline - time.time() - self.after_training_s, 0) // per_epoch)
        estimate = math.ceil(iteration / self.iterations_per_epoch) + more
        return min(estimate, self.epochs) if self.epochs else max(estimate, 1)
