"""Shared helpers for bench scripts: matmul peak, timing, the RESULT line."""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch


def setup_threads() -> int:
    from ownllm.train.distributed import set_threads

    return set_threads()


def matmul_peak(dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Best achieved FLOP/s of an n×n×n matmul (the machine's practical peak for this dtype)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def result_line(**kv) -> str:
    return "RESULT " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items())


@contextlib.contextmanager
def run_or_pretrain(run: str | None, seconds: float):
    """Yield `run`, or (when None) a tiny model pretrained for `seconds` on Shakespeare in a temp dir."""
    if run is not None:
        yield Path(run)
        return
    from ownllm.config import TrainConfig
    from ownllm.train.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        print(f"no --run: pretraining a tiny model for {seconds:.0f}s …")
        pretrain(Path(tmp) / "base", TrainConfig(data="shakespeare", time_budget=seconds), preset="tiny",
                 progress=False, log=lambda *a: None)
        yield Path(tmp) / "base"
