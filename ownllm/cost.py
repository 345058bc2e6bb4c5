"""What a stage cost: tokens processed, estimated FLOPs, wall and CPU time, peak memory, energy.

Where it sits: at the bottom with metrics. The model (model.GPT) reports every forward pass to
`count_forward`; `measure()` scopes read those counters, the process clock and the kernel's
peak-RSS mark around a stage. The Trainer writes one `event: "cost"` row per run to its
metrics.jsonl, and both quickstarts put a cost table on their report card.

How each figure is made (docs/weaknesses.md says the same for users):
- tokens: token positions run through the model's layers (prefill, decode, training, scoring).
- FLOPs: 2 × (matmul weights) per token forward, plus 4 × layers × heads × head_dim × (context
  attended: the whole block, as dense kernels compute the masked half too) for attention; a
  backward pass adds 1× the forward for activation gradients (of the blocks it runs through: LoRA
  on the top blocks only stops it below them) and (trainable share)× for weight gradients — 6N
  per token for full training, about 4N for LoRA (Kaplan et al. 2020's C ≈ 6ND with the
  attention term). Embedding lookups count nothing.
- peak memory: the process's resident-set high-water mark (VmHWM), reset at each scope's start
  through /proc/self/clear_refs, so a later stage does not inherit an earlier one's peak; CUDA's
  allocator peak beside it.
- energy: the CPU package counter (RAPL) where the kernel lets us read it, else an estimate: CPU
  seconds × watts per busy core (COST_WATTS_PER_CORE, or OWNLLM_WATTS_PER_CORE), plus wall × a
  stated GPU draw while CUDA is in use. The method used is named beside every figure.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# stated assumptions of the energy estimate where nothing is measured (override by environment)
COST_WATTS_PER_CORE = 10.0     # a busy server/desktop core incl. its share of uncore and memory
COST_WATTS_GPU = 300.0         # a data-centre GPU under load (H100 PCIe: 350 W board limit)
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")

_lock = threading.Lock()
_totals = {"tokens": 0, "train_tokens": 0, "flops": 0.0}
_open: list["Meter"] = []


def _weights(module) -> int:
    """Multiply-adds per token of a linear layer (plain, LoRA or quantised) or of a tree of them."""
    n = 0
    for m in module.modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            n += m.in_features * m.out_features + getattr(m, "rank", 0) * (m.in_features + m.out_features)
    return n


def _matmul_params(model) -> tuple[int, int]:
    """(weights in the layers' matmuls, weights in the output head), cached on the model."""
    cached = getattr(model, "_cost_params", None)
    if cached is None:
        cached = (_weights(model.layers), _weights(model.lm_head))
        model._cost_params = cached
    return cached


def _trainable_share(model) -> float:
    total = trainable = 0
    for p in [*model.layers.parameters(), *model.lm_head.parameters()]:
        if p.dim() == 2:
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable / max(total, 1)


def _backward_reach(model) -> float:
    """The share of the blocks the backward pass runs through: from the lowest block holding a
    trainable weight (or all of them when the embeddings train) to the top."""
    if any(p.requires_grad for p in model.embed_tokens.parameters()):
        return 1.0
    n = len(model.layers)
    lowest = next((i for i, b in enumerate(model.layers) if any(p.requires_grad for p in b.parameters())), n)
    return (n - lowest) / max(n, 1)


def count_forward(model, batch: int, new: int, past: int = 0, head_positions: int | None = None) -> None:
    """Record one forward pass: `batch` rows of `new` tokens after `past` cached ones; the output
    head over `head_positions` positions (default every new one). Training (grad enabled and a
    trainable weight) adds the backward's share."""
    import torch

    if torch.compiler.is_compiling():   # a compiled graph holds no Python side effects: its caller counts
        return
    cfg = model.config
    body, head = _matmul_params(model)
    tokens = batch * new
    attended = past + new   # dense kernels compute the whole block, masked half included
    body_flops = 2.0 * body * tokens + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attended * tokens
    head_flops = 2.0 * head * (batch * new if head_positions is None else head_positions)
    flops = body_flops + head_flops
    train = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    if train:   # backward: activation gradients down to the lowest trainable block, weight gradients
        flops += body_flops * _backward_reach(model) + head_flops + flops * _trainable_share(model)
    with _lock:
        _totals["tokens"] += tokens
        _totals["flops"] += flops
        if train:
            _totals["train_tokens"] += tokens


def totals() -> dict:
    with _lock:
        return dict(_totals)


def watts_per_core() -> float:
    return float(os.environ.get("OWNLLM_WATTS_PER_CORE", COST_WATTS_PER_CORE))


def rss_peak_kb() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> None:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def _rapl_uj() -> int | None:
    try:
        return int(RAPL.read_text())
    except (OSError, ValueError):
        return None


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Meter:
    """One open measurement; `.result` is filled when its scope ends."""

    def __init__(self, label: str):
        self.label = label
        self.peak_kb = 0
        self.result: dict = {}

    def _fold_peak(self, kb: int | None) -> None:
        if kb:
            self.peak_kb = max(self.peak_kb, kb)


def _fold_into_open() -> None:
    """Scopes nest: before the peak mark is reset, every open scope keeps what it has seen."""
    kb = rss_peak_kb()
    for m in _open:
        m._fold_peak(kb)


@contextmanager
def measure(label: str = ""):
    """`with measure("sft") as m: …` then m.result: tokens, train_tokens, flops, wall_s, cpu_s,
    peak_rss_mb, peak_gpu_mb (CUDA only), energy_wh and energy_method."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    m = Meter(label)
    _fold_into_open()
    _reset_rss_peak()
    _open.append(m)
    start = totals()
    t0, c0, e0 = time.perf_counter(), _cpu_s(), _rapl_uj()
    try:
        yield m
    finally:
        wall, cpu, e1 = time.perf_counter() - t0, _cpu_s() - c0, _rapl_uj()
        _fold_into_open()
        _open.remove(m)
        end = totals()
        cuda = cuda or (torch.cuda.is_available() and torch.cuda.is_initialized())
        if e0 is not None and e1 is not None and e1 >= e0:
            wh, method = (e1 - e0) / 3.6e9, "measured: CPU package (RAPL)"
        else:
            wh, method = cpu * watts_per_core() / 3600, f"estimated: {watts_per_core():g} W per busy core"
        if cuda:
            wh += wall * COST_WATTS_GPU / 3600
            method += f" + {COST_WATTS_GPU:g} W GPU"
        m.result = {"tokens": end["tokens"] - start["tokens"], "train_tokens": end["train_tokens"] - start["train_tokens"],
                    "flops": end["flops"] - start["flops"], "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                    "peak_rss_mb": round(m.peak_kb / 1024, 1),
                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                    "energy_wh": round(wh, 6), "energy_method": method}


def add(a: dict, b: dict) -> dict:
    """Two stages' costs as one (peaks: the larger)."""
    out = {k: a.get(k, 0) + b.get(k, 0) for k in ("tokens", "train_tokens", "flops", "wall_s", "cpu_s", "energy_wh")}
    out["peak_rss_mb"] = max(a.get("peak_rss_mb") or 0, b.get("peak_rss_mb") or 0)
    gpus = [x.get("peak_gpu_mb") for x in (a, b) if x.get("peak_gpu_mb") is not None]
    out["peak_gpu_mb"] = max(gpus) if gpus else None
    out["energy_method"] = a.get("energy_method") or b.get("energy_method")
    return out


def total(stages: dict[str, dict]) -> dict:
    """Every stage's cost as one."""
    out: dict = {}
    for c in stages.values():
        out = add(out, c) if out else dict(c)
    return out


def summary_line(c: dict) -> str:
    """One line for a terminal."""
    gpu = f", GPU peak {c['peak_gpu_mb']:,.0f} MB" if c.get("peak_gpu_mb") else ""
    return (f"cost: {c['tokens']:,} tokens ({c['train_tokens']:,} trained on), {c['flops']:.3g} FLOPs, "
            f"{c['wall_s']:.0f}s wall, {c['cpu_s']:.0f} CPU-s, peak RSS {c['peak_rss_mb']:,.0f} MB{gpu}, "
            f"≈{c['energy_wh']:.3g} Wh ({c['energy_method']})")


def cost_table(stages: dict[str, dict]) -> list[str]:
    """Markdown rows: one per stage, then the total."""
    rows = ["| stage | tokens | trained on | FLOPs (est.) | wall | CPU-s | peak RSS | energy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [_row(name, c) for name, c in stages.items()]
    whole = total(stages)
    if whole:
        rows.append(_row("**total**", whole))
        rows += ["", f"Energy: {whole['energy_method']}; FLOPs: 2 per weight per token forward plus attention, "
                 "backward 1× forward plus the trainable share (docs/cost.md)."]
    return rows


def _row(name: str, c: dict) -> str:
    return (f"| {name} | {c['tokens']:,} | {c['train_tokens']:,} | {c['flops']:.3g} | {c['wall_s'] / 60:.1f} min | "
            f"{c['cpu_s']:,.0f} | {c['peak_rss_mb']:,.0f} MB | {c['energy_wh']:.3g} Wh |")


class Stages:
    """Consecutive stages of one pipeline: `stages.start("sft")` ends the stage before and opens
    this one; `stop()` ends the last. `.costs`: stage name → cost, in order."""

    def __init__(self):
        self.costs: dict[str, dict] = {}
        self._open = None

    def start(self, name: str) -> None:
        self.stop()
        cm = measure(name)
        self._open = (name, cm, cm.__enter__())

    def stop(self) -> None:
        if self._open is not None:
            name, cm, meter = self._open
            self._open = None
            cm.__exit__(None, None, None)
            self.costs[name] = meter.result


def result_keys(stages: dict[str, dict]) -> str:
    """A pipeline's total cost as `RESULT` keys."""
    whole = total(stages)
    return (f"tokens={whole['tokens']} tflops={whole['flops'] / 1e12:.3f} energy_wh={whole['energy_wh']:.3f} "
            f"peak_rss_mb={whole['peak_rss_mb']:.0f}")
