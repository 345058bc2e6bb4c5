"""Weight-only int8 quantisation of the transformer's linear layers (per output channel).

Where it sits: `ownllm serve --quantize int8` and bench/quantize.py. Each nn.Linear in the
blocks becomes an `Int8Linear`: int8 weights plus one fp32 scale per output row
(scale = max|w_row| / 127, w ≈ scale · q), ~4x smaller than fp32. The matmul dequantises on the
fly: PyTorch's CPU int8 weight-only kernel (`aten._weight_int8pack_mm`) measured 7x slower than
fp32 at one row and 110x at 4,096 rows here (256→704), the dequantising path 2x slower per layer.
So int8 buys memory, not speed, on this CPU. Embeddings and the (tied) output head stay in full
precision: few parameters at this size, and the most sensitive to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


def quantize_int8(model: nn.Module) -> int:
    """Replace the blocks' nn.Linear layers in place; returns how many were replaced."""
    n = 0
    for block in model.layers:
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    setattr(mod, child_name, Int8Linear(child))
                    n += 1
    model.quantized = "int8"
    return n


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the blocks' linear weights (int8 weights + scales once quantised)."""
    total = 0
    for block in model.layers:
        for mod in block.modules():
            if type(mod) is nn.Linear:
                total += mod.weight.numel() * mod.weight.element_size()
            elif isinstance(mod, Int8Linear):
                total += mod.qweight.numel() + mod.scale.numel() * mod.scale.element_size()
    return total
