"""Training objectives as small pure functions (tests call them directly).

Where it sits: the Trainer calls `loss_fn(model, batch)`; each stage picks one of these. Losses
are returned as (sum, count) so the Trainer can weigh every target token equally across
micro-batches; evaluation sums the same quantity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL in nats, number of targets), in fp32; targets of -100 are ignored."""
    total = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, (targets != -100).sum()


def lm_step(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction on (inputs, targets)."""
    x, y = batch
    return summed_nll(model(x), y)


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Total NLL in nats → bits per UTF-8 byte: comparable across tokenizers."""
    return nll_nats / (math.log(2) * n_bytes)
