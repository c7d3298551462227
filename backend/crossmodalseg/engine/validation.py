"""Validation during training: per-structure Dice of the ensemble, cheap enough to run inside a time budget.

Whole volumes on the plan's grid with non-overlapping sliding windows (no blending, the training precision), on at
most MAX_CASES cases. The scores say what they were measured on: `held-out` cases, or, when the dataset has too
few labelled cases to hold any out, `training-set` cases (an optimistic figure, named so).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..methods import Method
from .inferer import class_index, dice_between, predict_probabilities

MAX_CASES = 4
HELD_OUT, TRAINING_SET = "held-out", "training-set"


class Validation:
    def __init__(self, method: Method, items: list[dict], held_out: bool):
        self.method = method
        self.items = items[:MAX_CASES]
        self.on = HELD_OUT if held_out else TRAINING_SET
        self.last_seconds = 0.0

    @property
    def description(self) -> str:
        n = len(self.items)
        return (f"Dice on {n} held-out case(s)" if self.on == HELD_OUT
                else f"training-set Dice ({n} training case(s); no case could be held out)")

    def __call__(self, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """Per-structure Dice, the mean over cases (structures absent from every case and prediction: left out),
        and their mean over structures as `mean`."""
        started = time.perf_counter()
        per_structure: dict[str, list[float]] = {s: [] for s in self.method.task.structures}
        for item in self.items:
            probs = predict_probabilities(self.method, item["image"], item["available"], device, overlap=0.0,
                                          blend="constant", amp_dtype=amp_dtype, on_device=True)
            predicted = class_index(self.method.ensemble(probs))
            for name, value in dice_between(predicted, item["label"][0], self.method.task.structures).items():
                if value is not None:
                    per_structure[name].append(value)
        self.method.train_mode(True)
        result = {name: round(float(np.mean(v)), 4) for name, v in per_structure.items() if v}
        if result:
            result["mean"] = round(float(np.mean(list(result.values()))), 4)
        self.last_seconds = time.perf_counter() - started
        return result
