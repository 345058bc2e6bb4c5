"""Devices and multi-process training (PyTorch DDP or FSDP2 under `torchrun`).

Where it sits: the Trainer asks `context()` which device to use and whether it runs as one of
several processes. Started by `torchrun --nproc_per_node N -m ownllm pretrain|sft …`, each process
joins the process group (NCCL on GPUs, Gloo on CPUs), trains on its own batches, and only rank 0
writes the run directory (config, shards, metrics, checkpoints). By default each process holds a
whole replica wrapped in `DistributedDataParallel`; with `--set parallel=fsdp` (`shard`) each
holds 1/N of the weights, gradients and optimizer state (PyTorch's `fully_shard`), for models
whose replica would not fit. Without torchrun nothing here talks to other processes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ownllm.errors import OwnLLMError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def set_threads(n: int | None = None) -> int:
    """PyTorch's CPU threads: `n`, or every core this process may run on (taskset included)."""
    n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    torch.set_num_threads(n)
    return n


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU when CUDA is there, else the CPU; or a torch device string."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OwnLLMError(f"--set device={name!r}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OwnLLMError(f"--set device={name}: this PyTorch build sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def context(device: str = "auto") -> Context:
    """This process's place: started by torchrun (WORLD_SIZE > 1) it joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local, dev)


def current() -> Context:
    """This process's rank and world size as torchrun set them (the device is not resolved)."""
    return Context(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def finish(completed: bool = False) -> None:
    """Leave the process group (if this process joined one). `completed`: this rank got through
    normally, so first wait for every rank: a rank that tore its Gloo connections down while
    another was still saving could abort at exit ("terminate called without an active exception",
    2 of ~25 runs of the FSDP test). After an error no barrier: the other ranks may never come."""
    if dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first(device: str = "auto"):
    """Rank 0 runs the block first (e.g. writes shards), then the other ranks run it (read them)."""
    ctx = context(device)
    if not ctx.is_main:
        barrier()
    yield ctx
    if ctx.is_main:
        barrier()


def to_device(batch, device: torch.device):
    """Tensors of a batch (nested in dicts, lists, tuples) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_model_device(batch, model: torch.nn.Module):
    """A batch (built on the CPU) where `model` is: evaluation code works on any device."""
    return to_device(batch, device_of(model))


class LossModule(torch.nn.Module):
    """model + loss function as one module, so DistributedDataParallel sees the whole forward
    (stages' losses call model parts such as `hidden_states` and `lm_head`, not model())."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(model: torch.nn.Module, loss_fn, device: torch.device) -> torch.nn.Module:
    """FSDP2 over all processes: each Block's parameters sharded as one unit (gathered just before
    it runs, freed after), the rest (embeddings, final norm, heads) at the root. The root is
    model + loss (LossModule), so a stage's loss, which calls model parts rather than model(),
    still runs inside the root's forward. Every rank starts from rank 0's weights, as DDP does.
    Returns the root; the optimizer must be built after this (it holds the sharded parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    return fully_shard(LossModule(model, loss_fn), mesh=mesh)


def full_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """(model weights, optimizer state) of a sharded root, whole, on the CPU of rank 0 (other ranks
    get empty dicts). A collective call: every rank makes it at the same point."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(root, options=opts).items()}
    return weights, (get_optimizer_state_dict(root, optimizer, options=opts) if optimizer is not None else None)


def load_full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a whole optimizer state (as `full_state` returned it) back onto the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
