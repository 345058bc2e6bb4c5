"""Training objectives as small pure functions (tests call them directly).

Where it sits: the Trainer calls `loss_fn(model, batch)`; each stage picks one of these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over targets != ignore_index (fp32 for stability)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def lm_step(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, number of target tokens): the Trainer divides by the step's total
    count, so a step's loss is a per-token mean however the batch is split into micro-batches."""
    x, y = batch
    logits = model(x)
    total = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, (y != -100).sum()


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Convert mean loss per token into bits per UTF-8 byte: comparable across tokenizers."""
    import math

    return loss_nats_per_token * tokens / (n_bytes * math.log(2))
