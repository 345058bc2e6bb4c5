"""Quantised linear layers: int8 and int4 weight-only, and int8 weights with int8 activations.

Where it sits: `--quantize int8|int4|w8a8` on `serve`, `chat`, `generate`, `ask` and `agent`;
bench/quantize.py and bench/real_model.py. The embedding lookup stays full precision; the output
head is quantised too (a tied one gets its own copy).

int8 (`Int8Linear`): int8 weights plus one fp32 scale per output row (scale = max|w_row| / 127),
~4x smaller than fp32, activations untouched. Kernels: on a CPU with native bfloat16 (AVX-512
BF16 or AMX) decode-sized calls use `aten._weight_int8pack_mm` with bfloat16 activations (about
twice fp32's speed for a 0.5B model's layer at one row; only for shapes checked at quantisation
time: in-features a multiple of 16 and results within 2% of the dequantised product). Elsewhere
the layer computes `linear(x, q) * scale` with the weights dequantised on the fly: slow eagerly,
but inside the compiled decode step (inference/engine.py) inductor turns it into its own
weight-only int8 GEMM.

w8a8: the same int8 weights, and the activations quantised to int8 per call (one scale per call)
for PyTorch's x86 int8 GEMM (fbgemm, AVX2): the fastest path on CPUs without native bfloat16,
prefill and decode alike, but an LLM's activations have outlier channels (an MLP's down
projection sees values ~1000x their mean), so replies drift from full precision sooner
(bench/real_model.py reports the agreement).

int4 (`Int4Linear`) is GGUF's Q4_1 layout: groups of 32 weights along the input, each with a scale
d and a minimum m, w = q·d + m for q in 0…15 (PyTorch's `_weight_int4pack_mm_for_cpu` stores the
same thing as (q − 8)·d + (m + 8d)). A model imported from a Q4_1 file therefore gets back exactly
the weights it was shipped with (a group's minimum and maximum are its q = 0 and q = 15). The
kernel is fast on AVX-512; on AVX2-only CPUs PyTorch's int4 kernel is several times slower than
fp32 (bench/real_model.py).
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import QUANTIZE_KINDS
from ownllm.model import stacked_bias

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


def _fbgemm() -> bool:
    """Whether PyTorch's x86 int8 GEMM (fbgemm) is here: dynamic int8 linear layers on any x86
    CPU with AVX2, prefill and decode alike."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    import warnings

    with warnings.catch_warnings():   # quantised tensors are deprecated; the packed GEMM is what runs
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(qweight, scale.double(),
                                                      torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, bias)


_FBGEMM_LAYERS: "weakref.WeakValueDictionary[int, Int8Linear]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("ownllm::int8_linear_fbgemm", mutates_args=())
def _int8_linear_fbgemm(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The fbgemm int8 GEMM as an op a compiled graph can call: the packed weights are a C++ object
    dynamo cannot trace, so the graph names them by handle."""
    return torch.ops.quantized.linear_dynamic(x, _FBGEMM_LAYERS[handle]._fbgemm, True)


@_int8_linear_fbgemm.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


def _fused_shell(cls, layers: list) -> nn.Module:
    """An empty `cls` layer reading the layers' input and writing all their rows, biases stacked."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features = layers[0].in_features, sum(m.out_features for m in layers)
    fused.register_buffer("bias", stacked_bias(layers))
    return fused


class Int8Linear(nn.Module):
    """`kernel`: "pack" (int8 weights × bfloat16 activations at decode-sized calls, chosen on CPUs
    with native bfloat16), "dequant" (the product with the dequantised weights: exact; chosen
    elsewhere) or "fbgemm" (w8a8: int8 activations too)."""

    def __init__(self, linear: nn.Linear, kernel: str | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        cpu = w.device.type == "cpu"
        if kernel is None:
            kernel = "pack" if cpu and _pack_kernel_pays(self.qweight, scale) else "dequant"
        self.register_buffer("scale_bf16", None, persistent=False)
        self.set_kernel(kernel)

    def set_kernel(self, kernel: str) -> None:
        if kernel not in ("pack", "fbgemm", "dequant"):
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        if kernel == "fbgemm" and not _fbgemm():
            raise ValueError("w8a8 needs PyTorch's x86 int8 GEMM (fbgemm), which this build lacks")
        self.kernel = kernel
        self.use_pack = kernel == "pack"
        self.scale_bf16 = self.scale.bfloat16() if self.use_pack else None
        self._fbgemm = _fbgemm_pack(self.qweight, self.scale, self.bias) if kernel == "fbgemm" else None
        if self._fbgemm is not None:
            self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fbgemm is not None and x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).float().contiguous()
            # reduce_range: 7-bit activations, so AVX2's saturating 16-bit pair sums cannot overflow
            y = (torch.ops.ownllm.int8_linear_fbgemm(flat, self._handle, self.out_features)
                 if torch.compiler.is_compiling() else torch.ops.quantized.linear_dynamic(flat, self._fbgemm, True))
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.use_pack and x.device.type == "cpu" and x.numel() <= PACK_ROWS * self.in_features:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale_bf16)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @classmethod
    def fuse(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing several that read the same input (q/k/v, gate/up): rows stacked,
        each keeping its own scale, so the outputs are the same; one kernel call instead of several."""
        fused = _fused_shell(cls, layers)
        fused.register_buffer("qweight", torch.cat([m.qweight for m in layers]))
        fused.register_buffer("scale", torch.cat([m.scale for m in layers]))
        fused.register_buffer("scale_bf16", None, persistent=False)
        fused.set_kernel(layers[0].kernel)
        return fused

    def _register(self) -> None:
        """Give the packed weights a key a compiled graph can name (dropped with the layer)."""
        self._handle = next(_HANDLES)
        _FBGEMM_LAYERS[self._handle] = self

    def __setstate__(self, state):   # a deep copy registers its own packed weights
        super().__setstate__(state)
        if self._fbgemm is not None:
            self._register()

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


INT4_GROUP = 32


def int4_supported(linear: nn.Linear) -> bool:
    """Whether `Int4Linear` can hold this layer: in-features in whole groups, an even row count,
    on a CPU build of PyTorch that has the kernel."""
    return (linear.in_features % INT4_GROUP == 0 and linear.out_features % 2 == 0
            and linear.weight.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not int4_supported(linear):
            raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP} (got {linear.in_features})")
        w = linear.weight.detach().float()
        n, k = w.shape
        g = w.view(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((g - lo) / d).clamp(0, 15).to(torch.int32).view(n, k)
        self.in_features, self.out_features = k, n
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (groups, out, 2): scale and the zero point of (q - 8)
        self.register_buffer("scales_zeros", torch.stack([d.squeeze(-1).t(), (lo + 8 * d).squeeze(-1).t()], -1)
                             .contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @classmethod
    def fuse(cls, layers: list["Int4Linear"]) -> "Int4Linear":
        """See Int8Linear.fuse: the packed rows and their groups' scales stacked."""
        fused = _fused_shell(cls, layers)
        fused.register_buffer("packed", torch.cat([m.packed for m in layers]))
        fused.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in layers], dim=1).contiguous())
        return fused

    def dequantized(self) -> torch.Tensor:
        eye = torch.eye(self.in_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP, self.scales_zeros).t()


QUANTIZED = QUANTIZE_KINDS


def quantize(model: nn.Module, kind: str, head: bool = True) -> int:
    """Replace the blocks' nn.Linear layers in place with `kind`'s weight-only layers (and the
    output head unless head=False); returns how many were replaced. A tied head gets its own
    quantised copy: the embedding lookup stays full precision, and the head — a vocabulary-sized
    product at every decode step, the largest single cost for a 150k-token vocabulary — reads the
    small weights (int8 for int4: the head's error reaches every logit). A layer int4 cannot hold
    (in-features not in groups of 32) gets int8."""
    if kind not in QUANTIZED:
        raise ValueError(f"quantize {kind!r}: choose one of {', '.join(QUANTIZED)}")

    def small(lin: nn.Linear) -> nn.Module:
        if kind == "int4" and int4_supported(lin):
            return Int4Linear(lin)
        return Int8Linear(lin, kernel="fbgemm" if kind == "w8a8" else None)

    n = 0
    for block in model.layers:
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    setattr(mod, child_name, small(child))
                    n += 1
    if head and type(model.lm_head) is nn.Linear:
        # int4 keeps an int8 head, as Q4 GGUF files keep theirs at 6-8 bits: every logit reads it
        model.lm_head = Int8Linear(model.lm_head) if kind == "int4" else small(model.lm_head)
        n += 1
    fuse_projections(model)
    model.quantized = kind
    return n


FUSED = {"_qkv": ("q_proj", "k_proj", "v_proj"), "_gate_up": ("gate_proj", "up_proj")}


def fuse_projections(model: nn.Module) -> None:
    """Give each attention and MLP of a quantised model one layer for its q/k/v and its gate/up
    (model.project uses it, compiled or not: a graph cannot fuse the kernels' calls itself). Kept
    out of the module tree, so nothing is saved twice."""
    for mod in model.modules():
        for key, names in FUSED.items():
            layers = [getattr(mod, n, None) for n in names]
            if all(isinstance(m, Int8Linear) for m in layers) and len({m.kernel for m in layers}) == 1:
                fused = Int8Linear.fuse(layers)
                mod.__dict__[key + "_quantized"] = (fused, [m.out_features for m in layers])
                at = 0
                for m in layers:   # the separate layers become views of the fused one: no second copy
                    rows = slice(at, at + m.out_features)
                    m.qweight, m.scale = fused.qweight[rows], fused.scale[rows]
                    if m.bias is not None:
                        m.bias = fused.bias[rows]
                    if m.kernel == "fbgemm":
                        m.set_kernel("dequant")   # its own packed copy goes: the fused layer runs
                    at += m.out_features
            elif all(isinstance(m, Int4Linear) for m in layers):
                mod.__dict__[key + "_quantized"] = (Int4Linear.fuse(layers), [m.out_features for m in layers])


def quantize_int8(model: nn.Module, head: bool = True) -> int:
    """`quantize(model, "int8", head)`."""
    return quantize(model, "int8", head)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the blocks' linear weights (int8 weights + scales once quantised)."""
    total = 0
    for block in model.layers:
        for mod in block.modules():
            if type(mod) is nn.Linear:
                total += mod.weight.numel() * mod.weight.element_size()
            elif isinstance(mod, (Int8Linear, Int4Linear)):
                total += sum(b.numel() * b.element_size() for n, b in mod.named_buffers()
                             if n in ("qweight", "scale", "packed", "scales_zeros"))
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each tensor once (a tied head counts once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
