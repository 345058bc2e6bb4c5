"""LoRA: low-rank adapters on the attention and MLP projections; merge them back in.

Where it sits: `ownllm sft --lora` builds the model with `ModelConfig.lora_rank > 0`, freezes
everything but the adapters, and trains. A LoRA run directory stores base weights and adapters
in one `model.safetensors` (adapter tensors named `….lora_A` / `….lora_B` beside the base
`….weight`), so every loader works unchanged; `ownllm merge-lora` folds W + (α/r)·B·A into plain
weights (`merged_state_dict`; model.fold_adapters, checkpoint.load_plain) and writes a run with
`lora_rank = 0` that exports like any other.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x Wᵀ (+ b) + (α/r) · (x Aᵀ) Bᵀ. B starts at zero, so a
    freshly wrapped model computes exactly what the base model does."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scale


def is_lora_param(name: str) -> bool:
    return name.endswith(("lora_A", "lora_B"))


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """requires_grad only on adapters; returns (trainable, total) parameter counts."""
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_param(name)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain weights with every adapter folded in (no lora_* entries)."""
    sd = {k: v for k, v in model.state_dict().items() if not is_lora_param(k)}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            sd[f"{name}.weight"] = mod.merged_weight().detach().clone()
    return sd
