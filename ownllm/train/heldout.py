"""Held-out language-model quality: loss per token and bits per UTF-8 byte, per source.

Where it sits: `ownllm eval --run R` and the end of `pretrain`. Bits per byte divides the total
negative log-likelihood (in bits) by the UTF-8 bytes of the held-out text, so models with
different tokenizers compare fairly.
"""
from __future__ import annotations

import numpy as np
import torch

from ownllm.data.shards import Shards, random_batch, sequential_windows
from ownllm.train.distributed import on_model_device
from ownllm.train.objectives import bits_per_byte, summed_nll


@torch.no_grad()
def nll_sum(model, data: np.ndarray, seq_len: int, batch: int = 16) -> tuple[float, int]:
    """Total NLL (nats) and count of predicted tokens over `data`, in non-overlapping windows."""
    total, count = 0.0, 0
    for x, y in sequential_windows(data, seq_len, batch):
        x, y = on_model_device((x, y), model)
        s, n = summed_nll(model(x), y)
        total, count = total + float(s), count + int(n)
    return total, count


def evaluate_sources(model, shards: Shards, seq_len: int, max_tokens: int | None = None) -> list[dict]:
    """Per held-out source: val_loss (nats/token) and val_bpb; `max_tokens` caps each for speed."""
    rows = []
    for src in shards.meta["sources"]:
        v = src["val"]
        n = v["tokens"] if max_tokens is None else min(v["tokens"], max_tokens)
        data = shards.val[v["start"]: v["start"] + n]
        total, count = nll_sum(model, data, seq_len)
        n_bytes = v["bytes"] * (count / max(v["tokens"] - 1, 1))  # bytes covered, pro rata when capped
        rows.append({"source": src["name"], "tokens": count, "val_loss": total / count,
                     "val_bpb": bits_per_byte(total, n_bytes)})
    return rows


def quick_eval_fn(shards: Shards, seq_len: int, batches: int, batch_size: int = 16, seed: int = 0):
    """A fixed sample of val windows (same every call) for the loss curve during training."""
    gen = torch.Generator().manual_seed(seed)
    fixed = [random_batch(shards.val, batch_size, seq_len, gen) for _ in range(batches)]
    bpt = shards.val_bytes_per_token()

    def run(model) -> dict:
        sums = [summed_nll(model(x), y) for x, y in (on_model_device(b, model) for b in fixed)]
        loss = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, bpt)}  # per token: nats / (bytes per token)

    return run
