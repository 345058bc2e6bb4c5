"""The one training loop every stage uses.

Where it sits: a stage (pretrain, sft, …) builds a model, a `next_batch(gen)` function and a
`loss_fn(model, batch)`, and hands them to `Trainer`. The Trainer owns: AdamW with decoupled
weight decay on matrices only, warmup + schedule ending at the step or time budget, gradient
accumulation, clipping, bf16 autocast (chosen by measurement when dtype=auto), optional
torch.compile, periodic eval, atomic checkpoints with everything needed to resume bit-for-bit
(weights, optimizer, step, elapsed time, data RNG), metrics.jsonl, a progress bar and plots.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ownllm.checkpoint import load_state, load_weights, save_checkpoint
from ownllm.config import TrainConfig
from ownllm.errors import OwnLLMError
from ownllm.metrics import MetricsLog, plot_curves
from ownllm.train.schedule import lr_at

Batch = Any


def set_threads(n: int | None) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_dtype(model, loss_fn, batch, reps: int = 3) -> tuple[str, dict[str, float]]:
    """Time forward+backward in fp32 and under bf16 autocast, interleaved so machine noise hits
    both alike; pick bf16 when its best time is clearly lower. Gradients are cleared after."""
    if not (torch.cuda.is_available() or torch.backends.mkldnn.is_available()):
        return "float32", {}
    timings = {"float32": math.inf, "bfloat16": math.inf}
    for i in range(reps + 1):
        for dtype in timings:
            t0 = time.perf_counter()
            with autocast(dtype):
                loss, _ = loss_fn(model, batch)
            loss.backward()
            if i:  # the first round warms up kernels
                timings[dtype] = min(timings[dtype], time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    choice = "bfloat16" if timings["bfloat16"] < 0.9 * timings["float32"] else "float32"
    return choice, timings


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices + AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer):
        self.opts = opts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]

    def step(self) -> None:
        for o in self.opts:
            o.step()
            if any(g.get("fused") for g in o.param_groups):
                # fused AdamW updates weights in place without bumping their version counters;
                # bump them, so caches keyed on versions (the fused q/k/v weight used when
                # generating, model.FusedLinears) see the new weights: RL rollouts sample the
                # current policy, not the one from before training
                torch.autograd.graph.increment_version([p for g in o.param_groups for p in g["params"]])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.opts):
            raise ValueError("checkpoint was saved with a different optimizer")
        for o, s in zip(self.opts, state["optimizers"]):
            o.load_state_dict(s)


def _adamw(groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> Optimizers:
    """AdamW (decay on matrices only), or Muon on the hidden matrices with AdamW on embeddings,
    output head and norms. Each group's lr is `schedule × lr_scale`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.dim() < 2]
    matrices = [(n, p) for n, p in named if p.dim() >= 2]
    is_edge = lambda name: "embed" in name.split(".")[0] or "head" in name.split(".")[0]  # noqa: E731
    edge = [p for n, p in matrices if is_edge(n)]
    hidden = [p for n, p in matrices if not is_edge(n)]
    if cfg.optimizer == "adamw":
        return Optimizers(_adamw([{"params": edge + hidden, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg))
    if cfg.optimizer == "muon":
        adam = _adamw([{"params": edge, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg)
        muon = torch.optim.Muon([{"params": hidden, "lr_scale": cfg.muon_lr_scale}], lr=cfg.lr,
                                weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        return Optimizers(muon, adam)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, muon)")


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path,
                 next_batch: Callable[[torch.Generator], Batch], loss_fn: Callable[[Any, Batch], tuple[torch.Tensor, torch.Tensor]],
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, resume: bool = False,
                 tokens_per_batch: int = 0, extra_files: dict[str, bytes] | None = None, progress: bool = True,
                 step_stats: Callable[[], dict] | None = None, aux: Any = None,
                 plots: dict[str, tuple[str, ...]] | None = None):
        """step_stats: called after each step, its numbers join that step's metrics row (RL stages:
        reward, KL, entropy…); aux: an object with state_dict()/load_state_dict() saved with the
        checkpoint (e.g. an adaptive KL coefficient); plots: extra PNGs, file stem → metric keys."""
        self.model, self.cfg, self.run_dir = model, cfg, Path(run_dir)
        self.step_stats, self.aux, self.plots = step_stats, aux, plots or {}
        self.next_batch, self.loss_fn, self.evaluate = next_batch, loss_fn, evaluate
        self.tokens_per_batch = tokens_per_batch
        self.extra_files = extra_files or {}
        self.progress = progress
        if cfg.max_steps is None and cfg.time_budget is None:
            raise ValueError("give max_steps or time_budget")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        set_threads(cfg.threads)
        self.optimizer = make_optimizer(model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.elapsed, self.dtype = 0, 0.0, cfg.dtype
        if resume:
            self._restore()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume else None)
        self.forward_model = model
        if cfg.compile:  # per block when the model offers it: one graph reused by every layer compiles fast
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True  # a platform without a working compiler runs eagerly
            if hasattr(model, "compile_blocks"):
                model.compile_blocks()
            else:
                self.forward_model = torch.compile(model)

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "elapsed": self.elapsed, "dtype": self.dtype,
                 "data_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        return {**state, "aux": self.aux.state_dict()} if self.aux is not None else state

    def _restore(self) -> None:
        state = load_state(self.run_dir)
        self.step = load_weights(self.model, self.run_dir)
        if state["step"] != self.step:
            raise RuntimeError(f"{self.run_dir}: state.pt is at step {state['step']} but weights at {self.step}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.elapsed, self.dtype = state["elapsed"], state["dtype"]
        self.gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.aux is not None and "aux" in state:
            self.aux.load_state_dict(state["aux"])

    def checkpoint(self) -> None:
        self.metrics.flush()
        files = {"train_config.json": json.dumps({**asdict(self.cfg), "dtype_used": self.dtype}, indent=2).encode(),
                 **self.extra_files}
        save_checkpoint(self.run_dir, self.model, self._state(), self.step, files)
        rows = MetricsLog.read(self.run_dir / "metrics.jsonl")
        plot_curves(rows, self.run_dir / "plots" / "loss.png", title=f"{self.run_dir.name}: loss")
        for stem, keys in self.plots.items():
            plot_curves(rows, self.run_dir / "plots" / f"{stem}.png", keys=keys, title=f"{self.run_dir.name}: {stem}")

    # -- loop ----------------------------------------------------------------------------
    def progress_fraction(self) -> float:
        fr = []
        if self.cfg.max_steps:
            fr.append(self.step / self.cfg.max_steps)
        if self.cfg.time_budget:
            fr.append(self.elapsed / self.cfg.time_budget)
        return max(fr)

    def _done(self) -> bool:
        return self.progress_fraction() >= 1.0

    def _lr(self) -> float:
        return lr_at(self.progress_fraction(), self.step, lr=self.cfg.lr, warmup_steps=self.cfg.warmup_steps,
                     min_lr_ratio=self.cfg.min_lr_ratio, kind=self.cfg.schedule)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean loss per target token.

        Micro-batch losses are sums; gradients are divided by the step's total target count at
        the end, so padding and uneven micro-batches weigh every token equally (batch 8 × accum 1
        equals batch 1 × accum 8)."""
        lr = self._lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        total, count = torch.zeros(()), torch.zeros(())
        for _ in range(self.cfg.grad_accum):
            batch = self.next_batch(self.gen)
            with autocast(self.dtype):
                loss_sum, n = self.loss_fn(self.forward_model, batch)
            loss_sum.backward()
            total += loss_sum.detach().float()
            count += n
        count = count.clamp(min=1)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_div_(grads, count)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / count

    def run(self, stop_at_step: int | None = None) -> dict:
        """Train until the budget ends (or `stop_at_step`, which simulates a kill after a checkpoint)."""
        model = self.model.train()
        if self.dtype == "auto":
            self.dtype, timings = measure_dtype(model, self.loss_fn, self.next_batch(torch.Generator().manual_seed(0)))
            self.metrics.write(step=self.step, event="dtype", chosen=self.dtype,
                               **{f"{k}_s_per_microbatch": v for k, v in timings.items()})
        elif self.cfg.compile:  # compile before the clock starts (measure_dtype above does it too)
            with autocast(self.dtype):
                loss, _ = self.loss_fn(self.forward_model, self.next_batch(torch.Generator().manual_seed(0)))
            loss.backward()
            model.zero_grad(set_to_none=True)
        total = self.cfg.max_steps or None
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=self.run_dir.name)
        pending: list[tuple[int, torch.Tensor, float, float]] = []
        last_ckpt = time.perf_counter()
        last = {}
        try:
            while not self._done():
                t0 = time.perf_counter()
                lr = self._lr()
                loss = self.train_step()
                self.elapsed += time.perf_counter() - t0
                pending.append((self.step, loss, lr, self.elapsed, self.step_stats() if self.step_stats else {}))
                if len(pending) >= self.cfg.log_interval or self._done():
                    last = self._flush(pending, bar)
                    pending = []
                    if not math.isfinite(last["train_loss"]):
                        raise OwnLLMError(f"training diverged: loss became {last['train_loss']} at step {self.step} "
                                          f"(lr {self.cfg.lr:g}); lower it with --set lr=…; the last checkpoint is kept")
                if self.evaluate and self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0:
                    last.update(self._eval())
                if stop_at_step is not None and self.step >= stop_at_step:
                    self._flush(pending, bar)
                    self.checkpoint()
                    return {"step": self.step, "stopped": True}
                if time.perf_counter() - last_ckpt > self.cfg.checkpoint_interval:
                    self._flush(pending, bar)
                    pending = []
                    self.checkpoint()
                    last_ckpt = time.perf_counter()
        except KeyboardInterrupt:
            self._flush(pending, bar)
            self.checkpoint()
            bar.close()
            raise
        self._flush(pending, bar)
        bar.close()
        if self.evaluate and not (self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0):
            last.update(self._eval())
        self.checkpoint()
        self.metrics.close()
        return {"step": self.step, "elapsed_s": self.elapsed, "dtype": self.dtype, **last}

    def _flush(self, pending, bar) -> dict:
        if not pending:
            return {}
        losses = torch.stack([p[1] for p in pending]).tolist()  # one host sync for the whole window
        row = {}
        for (step, _, lr, elapsed, stats), loss in zip(pending, losses):
            row = dict(step=step, tokens=step * self.tokens_per_batch * self.cfg.grad_accum,
                       elapsed_s=round(elapsed, 3), lr=lr, train_loss=loss, **stats)
            self.metrics.write(**row)
        bar.update(pending[-1][0] - bar.n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{pending[-1][2]:.2e}", s=f"{pending[-1][3]:.0f}")
        return row

    def _eval(self) -> dict:
        self.model.eval()
        with torch.no_grad(), autocast(self.dtype):
            result = self.evaluate(self.model)
        self.model.train()
        self.metrics.write(step=self.step, elapsed_s=round(self.elapsed, 3), **result)
        self.metrics.flush()
        return result
