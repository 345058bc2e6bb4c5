"""Devices and multi-process training (PyTorch DDP under `torchrun`).

Where it sits: the Trainer asks `context()` which device to use and whether it runs as one of
several processes. Started by `torchrun --nproc_per_node N -m ownllm pretrain|sft …`, each process
joins the process group (NCCL on GPUs, Gloo on CPUs), trains a replica wrapped in
`DistributedDataParallel` on its own batches, and only rank 0 writes the run directory (config,
shards, metrics, checkpoints). Without torchrun nothing here talks to other processes.
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


def finish() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
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
