"""The one training loop every stage uses.

Where it sits: a stage (pretrain, sft, …) builds a model, a `next_batch(gen)` function and a
`loss_fn(model, batch)`, and hands them to `Trainer`. The Trainer owns: AdamW with decoupled
weight decay on matrices only, warmup + schedule ending at the step or time budget, gradient
accumulation, clipping, bf16 autocast (chosen by measurement when dtype=auto), optional
torch.compile, periodic eval, atomic checkpoints with everything needed to resume bit-for-bit
(weights, optimizer, step, elapsed time, data RNG), metrics.jsonl, a progress bar and plots.
It also places the model on the run's device (`device`: auto = the GPU when there is one) and,
started by `torchrun`, trains one DistributedDataParallel replica per process, or with
`parallel="fsdp"` one shard of the model per process (train/distributed.py): each rank draws its
own batches, gradients are averaged over ranks, every token of every rank weighs the same, and only
rank 0 writes metrics and checkpoints (FSDP: the shards gathered into whole weights first).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ownllm.checkpoint import load_state, load_weights, save_checkpoint, saved_step
from ownllm.config import TrainConfig
from ownllm.cost import measure
from ownllm.errors import OwnLLMError
from ownllm.lora import is_lora_param
from ownllm.metrics import MetricsLog, plot_curves
from ownllm.train import distributed as D
from ownllm.train.schedule import lr_at

Batch = Any


def autocast(dtype: str, device: torch.device | str = "cpu"):
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_dtype(model, loss_fn, batch, reps: int = 3, device: torch.device | str = "cpu",
                  early_stop: bool = True) -> tuple[str, dict[str, float]]:
    """Time forward+backward in fp32 and under bf16 autocast, interleaved so machine noise hits
    both alike; pick bf16 when its best time is clearly lower. Gradients are cleared after.
    Stops after the first timed round when one dtype is under 0.6x the other: for a large model
    every round costs a real step in each dtype (a 0.5B model here: 54 s fp32 + 19 s bf16) —
    unless early_stop is off (FSDP: every rank must run as many rounds, each forward gathers shards)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float32"), {}
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or not bf16_matmul_fast("cpu"):
        return "float32", {}   # (a CPU that emulates bf16 would spend minutes on one bf16 step)
    timings = {"float32": math.inf, "bfloat16": math.inf}
    for i in range(reps + 1):
        for dtype in timings:
            t0 = time.perf_counter()
            with autocast(dtype, device):
                loss, _ = loss_fn(model, batch)
            loss.backward()
            if i:  # the first round warms up kernels
                timings[dtype] = min(timings[dtype], time.perf_counter() - t0)
        if early_stop and i and not 0.6 < timings["bfloat16"] / timings["float32"] < 1 / 0.6:
            break   # clear already
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


def split_parameters(model: torch.nn.Module) -> tuple[list, list, list]:
    """Trainable parameters as (edge matrices: embeddings, output heads, LoRA factors; hidden
    matrices: the blocks' weights; vectors: norms and biases)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_edge = lambda name: (name.split(".")[0] in ("embed_tokens", "lm_head", "score", "score_gate")  # noqa: E731
                            or is_lora_param(name))
    return ([p for n, p in named if p.dim() >= 2 and is_edge(n)], [p for n, p in named if p.dim() >= 2 and not is_edge(n)],
            [p for n, p in named if p.dim() < 2])


@functools.lru_cache(maxsize=None)
def bf16_matmul_fast(device_type: str) -> bool:
    """Whether a bfloat16 matmul beats a float32 one on this device: a CPU without native bf16
    (AVX2 only, no AVX-512 BF16 or AMX) emulates it, hundreds of times slower."""
    if device_type != "cpu":
        return True
    x, times = torch.randn(256, 256), {}
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(dtype)
        y @ y
        t0 = time.perf_counter()
        for _ in range(3):
            y @ y
        times[dtype] = time.perf_counter() - t0
    return times[torch.bfloat16] < times[torch.float32]


def newton_schulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation, in float32 where bfloat16 matmuls are slow (torch's
    always runs in bfloat16: 10 s a step for the tiny model on an AVX2-only CPU, 0.3 GFLOP/s)."""
    if bf16_matmul_fast(grad.device.type):
        return _torch_newton_schulz(grad, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)


_torch_newton_schulz = torch.optim._muon._zeropower_via_newtonschulz
torch.optim._muon._zeropower_via_newtonschulz = newton_schulz


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> Optimizers:
    """AdamW (decay on matrices only), or Muon on the hidden matrices with AdamW on embeddings,
    output heads (lm_head, a reward/value model's score and likelihood gate), norms and LoRA's
    rank-r factors (Muon orthogonalises whole weight matrices; a LoRA run has none to train, so it
    is AdamW throughout).
    Each group's lr is `schedule × lr_scale`."""
    edge, hidden, no_decay = split_parameters(model)
    if cfg.optimizer == "adamw" or (cfg.optimizer == "muon" and not hidden):
        return Optimizers(_adamw([{"params": edge + hidden, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg))
    if cfg.optimizer == "muon":
        adam = _adamw([{"params": edge, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}], cfg)
        muon = torch.optim.Muon([{"params": hidden, "lr_scale": cfg.muon_lr_scale}], lr=cfg.lr,
                                weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        return Optimizers(muon, adam)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, muon)")


class _NoMetrics:
    """What ranks other than 0 write metrics to."""

    def write(self, **row) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


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
        self.ctx = D.context(cfg.device)
        self.device = self.ctx.device
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.device.type == "cpu":
            D.set_threads(cfg.threads or max(1, (os.cpu_count() or 1) // self.ctx.world_size))
        model.to(self.device)
        if cfg.parallel not in ("ddp", "fsdp"):
            raise OwnLLMError(f"--set parallel={cfg.parallel!r}: expected ddp or fsdp")
        use_fsdp = self.ctx.distributed and cfg.parallel == "fsdp"
        if use_fsdp and cfg.optimizer == "muon" and split_parameters(model)[1]:  # (LoRA: AdamW anyway)
            raise OwnLLMError(f"--set parallel=fsdp shards every weight matrix and optimizer={cfg.optimizer} needs whole "
                              "ones (Muon orthogonalises each matrix); use --set optimizer=adamw with fsdp")
        self.step, self.elapsed, self.dtype = 0, 0.0, cfg.dtype
        if resume:  # weights first: FSDP cuts its shards from them
            self.step = load_weights(model, self.run_dir)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.ctx.rank)  # each rank its own batches
        self.forward_model = model
        if cfg.compile:  # per block when the model offers it: one graph reused by every layer compiles fast
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True  # a platform without a working compiler runs eagerly
            if hasattr(model, "compile_blocks"):
                model.compile_blocks()
            else:
                self.forward_model = torch.compile(model)
        self.fsdp = None
        if use_fsdp:
            self.fsdp = D.shard(model, loss_fn, self.device)
        self.optimizer = make_optimizer(model, cfg)  # after sharding: FSDP's optimizer holds the shards
        if resume:
            self._restore()
        self.metrics = (MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume else None)
                        if self.ctx.is_main else _NoMetrics())
        self.ddp = None
        if self.ctx.distributed and not use_fsdp:  # replicas start from rank 0's weights; DDP averages gradients
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(D.LossModule(self.forward_model, loss_fn),
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                               find_unused_parameters=False)

    def _warmup_batch(self):
        """A batch drawn from a fixed seed (leaves the training data stream untouched), on the device."""
        return D.to_device(self.next_batch(torch.Generator().manual_seed(0)), self.device)

    def _plain_or_sharded_loss(self):
        """loss_fn(model, batch) for warm-up and the dtype probe: on the model itself (no collective
        calls, so ranks need not keep in step), except under FSDP, whose shards only gather in the root."""
        return (lambda _model, batch: self.fsdp(batch)) if self.fsdp is not None else self.loss_fn

    def _loss(self, batch):
        batch = D.to_device(batch, self.device)
        wrapped = self.ddp if self.ddp is not None else self.fsdp  # DDP, or the FSDP root, when there is one
        with autocast(self.dtype, self.device):
            return wrapped(batch) if wrapped is not None else self.loss_fn(self.forward_model, batch)

    def _whole_model(self, weights: dict) -> torch.nn.Module:
        """FSDP, rank 0: an unsharded copy of the model holding `weights` (gathered shards)."""
        whole = type(self.model)(self.model.config).to(self.device)
        whole.load_state_dict(weights)
        return whole

    def final_model(self) -> torch.nn.Module:
        """The trained model as a plain module (FSDP, rank 0: a whole copy read from the last checkpoint)."""
        if self.fsdp is None:
            return self.model
        whole = type(self.model)(self.model.config)
        load_weights(whole, self.run_dir)
        return whole.to(self.device)

    # -- state ---------------------------------------------------------------------------
    def _state(self, gather: bool = True, optimizer_state: dict | None = None) -> dict:
        optimizer = {"fsdp": optimizer_state} if self.fsdp is not None else self.optimizer.state_dict()
        state = {"optimizer": optimizer, "elapsed": self.elapsed, "dtype": self.dtype,
                 "data_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.ctx.distributed and gather:  # every rank's data position (a collective call)
            state["data_rngs"] = D.gather_objects(self.gen.get_state())
        return {**state, "aux": self.aux.state_dict()} if self.aux is not None else state

    def _restore(self) -> None:
        state = load_state(self.run_dir)
        if state["step"] != self.step:
            raise RuntimeError(f"{self.run_dir}: state.pt is at step {state['step']} but weights at {self.step}")
        saved_fsdp = "fsdp" in state["optimizer"]
        if saved_fsdp != (self.fsdp is not None):
            raise OwnLLMError(f"{self.run_dir}: saved {'with' if saved_fsdp else 'without'} --set parallel=fsdp; resume "
                              f"it the same way ({'torchrun and ' if saved_fsdp else ''}"
                              f"--set parallel={'fsdp' if saved_fsdp else 'ddp'})")
        if self.fsdp is not None:
            D.load_full_optimizer_state(self.fsdp, self.optimizer.opts[0], state["optimizer"]["fsdp"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.elapsed, self.dtype = state["elapsed"], state["dtype"]
        rngs = state.get("data_rngs", [state["data_rng"]])
        if len(rngs) > 1 and len(rngs) != self.ctx.world_size:
            raise OwnLLMError(f"{self.run_dir}: saved by {len(rngs)} processes; resume it with {len(rngs)} "
                              f"(torchrun --nproc_per_node {len(rngs)}), not {self.ctx.world_size}")
        if self.ctx.rank < len(rngs):  # a run saved by one process: other ranks keep their own seed
            self.gen.set_state(rngs[self.ctx.rank])
        torch.set_rng_state(state["torch_rng"])
        if self.aux is not None and "aux" in state:
            self.aux.load_state_dict(state["aux"])

    def checkpoint(self, gather: bool = True) -> None:
        """Every rank calls it at the same step (it gathers their data RNGs and FSDP's shards); rank 0 writes."""
        weights, optimizer_state = None, None
        if self.fsdp is not None:
            if not gather:  # interrupted: ranks are out of step and gathering shards takes all of them
                if self.ctx.is_main:
                    saved = saved_step(self.run_dir)
                    print(f"interrupted: FSDP shards cannot be gathered now; "
                          f"{f'the checkpoint at step {saved} is kept' if saved is not None else 'no checkpoint yet'}",
                          file=sys.stderr)
                return
            weights, optimizer_state = D.full_state(self.fsdp, self.optimizer.opts[0])
        state = self._state(gather, optimizer_state)
        if not self.ctx.is_main:
            return
        self.metrics.flush()
        files = {"train_config.json": json.dumps({**asdict(self.cfg), "dtype_used": self.dtype}, indent=2).encode(),
                 **self.extra_files}
        save_checkpoint(self.run_dir, self.model, state, self.step, files, weights=weights)
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
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for i in range(self.cfg.grad_accum):
            # DDP / FSDP average gradients once per step: not after the micro-batches before the last
            last_micro = i == self.cfg.grad_accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()
            if self.fsdp is not None:
                self.fsdp.set_requires_gradient_sync(last_micro)
            with sync:
                loss_sum, n = self._loss(self.next_batch(self.gen))
                loss_sum.backward()
            total += loss_sum.detach().float()
            count += n
        if self.ctx.distributed:  # the step's loss and tokens over all ranks
            total, count = D.all_reduce_sum(torch.stack([total, count])).unbind()
        count = count.clamp(min=1)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_div_(grads, count / self.ctx.world_size)  # DDP's and FSDP's gradients are the mean over ranks
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / count

    def run(self, stop_at_step: int | None = None) -> dict:
        """Train until the budget ends (or `stop_at_step`, which simulates a kill after a checkpoint).
        The result's `cost` (tokens, FLOPs, time, peak memory, energy: ownllm.cost) is also the
        last metrics row, `event: "cost"` (a resumed run's: what this process did)."""
        with measure(self.run_dir.name) as meter:
            result = self._run(stop_at_step)
        if result.get("stopped"):
            return result
        self.metrics.write(step=self.step, event="cost", **meter.result)
        self.metrics.close()
        return {**result, "cost": meter.result}

    def _run(self, stop_at_step: int | None) -> dict:
        model = self.model.train()
        if self.dtype == "auto":
            self.dtype, timings = measure_dtype(model, self._plain_or_sharded_loss(), self._warmup_batch(),
                                                device=self.device, early_stop=self.fsdp is None)
            if self.ctx.distributed:  # timings differ between processes: all follow rank 0
                self.dtype = D.gather_objects(self.dtype)[0]
            self.metrics.write(step=self.step, event="dtype", chosen=self.dtype,
                               **{f"{k}_s_per_microbatch": v for k, v in timings.items()})
        elif self.cfg.compile:  # compile before the clock starts (measure_dtype above does it too)
            with autocast(self.dtype, self.device):
                loss, _ = self._plain_or_sharded_loss()(self.forward_model, self._warmup_batch())
            loss.backward()
            model.zero_grad(set_to_none=True)
        total = self.cfg.max_steps or None
        bar = tqdm(total=total, initial=self.step, disable=not (self.progress and self.ctx.is_main), unit="step",
                   dynamic_ncols=True, desc=self.run_dir.name)
        pending: list[tuple[int, torch.Tensor, float, float]] = []
        last_ckpt = self.elapsed  # in training seconds: ranks agree on it (below), so they checkpoint together
        last = {}
        try:
            while not self._done():
                t0 = time.perf_counter()
                lr = self._lr()
                loss = self.train_step()
                self.elapsed += time.perf_counter() - t0
                if self.ctx.distributed:  # rank 0's clock decides when the budget ends, for all
                    self.elapsed = float(D.all_reduce_sum(torch.tensor([self.elapsed if self.ctx.is_main else 0.0],
                                                                       dtype=torch.float64)).item())
                pending.append((self.step, loss, lr, self.elapsed, self.step_stats() if self.step_stats else {}))
                if len(pending) >= self.cfg.log_interval or self._done():
                    last = self._flush(pending, bar)
                    pending = []
                    if not math.isfinite(last["train_loss"]):
                        raise OwnLLMError(f"training diverged: loss became {last['train_loss']} at step {self.step} "
                                          f"(lr {self.cfg.lr:g}); lower it with --set lr=…; the last checkpoint is kept")
                if self.evaluate and self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0 \
                        and (self.ctx.is_main or self.fsdp is not None):
                    last.update(self._eval())
                if stop_at_step is not None and self.step >= stop_at_step:
                    self._flush(pending, bar)
                    self.checkpoint()
                    return {"step": self.step, "stopped": True, "elapsed_s": self.elapsed}
                every = self.cfg.checkpoint_steps
                if self.elapsed - last_ckpt > self.cfg.checkpoint_interval or (every and self.step % every == 0
                                                                               and not self._done()):
                    self._flush(pending, bar)
                    pending = []
                    self.checkpoint()
                    last_ckpt = self.elapsed
        except KeyboardInterrupt:
            self._flush(pending, bar)
            self.checkpoint(gather=False)  # ranks are not in step here: no collective call
            bar.close()
            raise
        self._flush(pending, bar)
        bar.close()
        if self.evaluate and not (self.cfg.eval_interval and self.step % self.cfg.eval_interval == 0) \
                and (self.ctx.is_main or self.fsdp is not None):
            last.update(self._eval())
        self.checkpoint()
        return {"step": self.step, "elapsed_s": self.elapsed, "dtype": self.dtype, **last}

    def _flush(self, pending, bar) -> dict:
        if not pending:
            return {}
        losses = torch.stack([p[1] for p in pending]).tolist()  # one host sync for the whole window
        row = {}
        for (step, _, lr, elapsed, stats), loss in zip(pending, losses):
            row = dict(step=step, tokens=step * self.tokens_per_batch * self.cfg.grad_accum * self.ctx.world_size,
                       elapsed_s=round(elapsed, 3), lr=lr, train_loss=loss, **stats)
            self.metrics.write(**row)
        bar.update(pending[-1][0] - bar.n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{pending[-1][2]:.2e}", s=f"{pending[-1][3]:.0f}")
        return row

    def _eval(self) -> dict:
        """Rank 0 evaluates (FSDP: every rank gathers the shards, then rank 0 runs a whole copy)."""
        model = self.model
        if self.fsdp is not None:
            weights, _ = D.full_state(self.fsdp)
            if not self.ctx.is_main:
                return {}
            model = self._whole_model(weights)  # (for the evaluation only: freed after it)
        model.eval()
        with torch.no_grad(), autocast(self.dtype, self.device):
            result = self.evaluate(model)
        self.model.train()
        self.metrics.write(step=self.step, elapsed_s=round(self.elapsed, 3), **result)
        self.metrics.flush()
        return result
