"""Learning-rate schedules as pure functions of training progress in [0, 1].

Progress is steps/max_steps or elapsed/time_budget (whichever is further), so a time-budgeted
run decays to its floor exactly when the budget ends.
"""
from __future__ import annotations

import math


def lr_at(progress: float, step: int, *, lr: float, warmup_steps: int, min_lr_ratio: float,
          kind: str = "linear", stable_frac: float = 0.5) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    floor = lr * min_lr_ratio
    if kind == "constant":
        return lr
    if kind == "cosine":
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "wsd":  # warmup-stable-decay: flat, then linear to the floor over the last part
        if p < stable_frac:
            return lr
        return floor + (lr - floor) * (1 - p) / (1 - stable_frac)
    if kind == "linear":
        return floor + (lr - floor) * (1 - p)
    raise ValueError(f"unknown schedule {kind!r} (linear, cosine, wsd, constant)")
