"""Weight-only int8 quantisation of the transformer's linear layers (per output channel).

Where it sits: `ownllm serve --quantize int8`, `chat`/`generate --quantize int8` and
bench/quantize.py. Each nn.Linear in the blocks becomes an `Int8Linear`: int8 weights plus one
fp32 scale per output row (scale = max|w_row| / 127, w ≈ scale · q), ~4x smaller than fp32.
The output head is quantised too (a tied one gets its own int8 copy); the embedding lookup stays
in full precision.

Speed: decoding reads every weight once per token, so at a few rows (≤ PACK_ROWS) the layer uses
PyTorch's int8 weight-only kernel `aten._weight_int8pack_mm` with bfloat16 activations, which
reads the int8 weights directly: on a CPU with AVX-512 BF16 / AMX about twice as fast as fp32
for a 0.5B model's layer at one row. With fp32 activations the same kernel is ~8x slower than fp32, and for many rows (prefill) it loses to dequantising, so other
calls dequantise on the fly in the input's dtype. The kernel is used only on a CPU with native
bfloat16 (AVX-512 BF16 or AMX) and for layer shapes checked at quantisation time: in-features a
multiple of 16 (other sizes crash it or give wrong sums) and results within 2% of the
dequantised product; elsewhere the dequantising path runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 8   # at most this many rows per call use the int8 kernel (decode steps of small batches)
_PACK_CHOICE: dict[tuple[int, int], bool] = {}


def _fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), where the kernel pays."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def _pack_kernel_pays(qweight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `_weight_int8pack_mm` is safe and right for this (out, in) shape on this CPU, and
    the CPU has native bfloat16 (decided from the hardware, not by timing: the same every run)."""
    n, k = qweight.shape
    if k % 16 or not hasattr(torch.ops.aten, "_weight_int8pack_mm") or not _fast_bfloat16():
        return False
    if (n, k) not in _PACK_CHOICE:
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = F.linear(x, qweight.float()) * scale
            got = torch._weight_int8pack_mm(x.bfloat16(), qweight, scale.bfloat16()).float()
        _PACK_CHOICE[(n, k)] = bool((got - ref).norm() <= 0.02 * ref.norm())
    return _PACK_CHOICE[(n, k)]


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.use_pack = w.device.type == "cpu" and _pack_kernel_pays(self.qweight, scale)
        self.register_buffer("scale_bf16", scale.bfloat16() if self.use_pack else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_pack and x.device.type == "cpu" and x.numel() <= PACK_ROWS * self.in_features:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale_bf16)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


def quantize_int8(model: nn.Module, head: bool = True) -> int:
    """Replace the blocks' nn.Linear layers in place (and the output head unless head=False);
    returns how many were replaced. A tied head gets its own int8 copy: the embedding lookup stays
    full precision, and the head — a vocabulary-sized product at every decode step, the largest
    single cost for a 150k-token vocabulary — reads int8."""
    n = 0
    for block in model.layers:
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    setattr(mod, child_name, Int8Linear(child))
                    n += 1
    if head and type(model.lm_head) is nn.Linear:
        model.lm_head = Int8Linear(model.lm_head)
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


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each tensor once (a tied head counts once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
