"""Ranks, world size and who owns which experts (lesson 00).

A process group is a set of ranks that run collectives together; `None` means the
default group of all ranks. Expert parallelism gives rank r of an N-rank group the
contiguous block of experts r·E/N … (r+1)·E/N − 1.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def experts_of_rank(num_experts: int, rank: int, world_size: int) -> range:
    """The global ids of the experts that `rank` owns among `world_size` ranks."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got rank={rank}, world_size={world_size}")
    if num_experts % world_size:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({world_size}) "
            f"so that every rank owns the same number of experts"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def rank_and_size(group=None) -> tuple[int, int]:
    """This process's rank in `group` and the group's size; a clear error before any collective
    if torch.distributed was never initialized (no rank would be left waiting)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: run this code under torchrun (the course's "
            "launcher does it for you) and call dist.init_process_group first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_grads(params, group=None) -> None:
    """Sum the gradients of `params` over `group` (replicated weights, each copy fed its own tokens). A rank
    whose parameter got no gradient (say, it had no tokens) joins with zeros, or the others would wait."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)


def init_from_torchrun() -> torch.device:
    """Join the process group torchrun describes and return this rank's device: nccl and
    cuda:LOCAL_RANK when there are GPUs, gloo and the CPU otherwise (for the `python -m` measurements)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # binds the rank to its GPU up front
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def leave_torchrun() -> None:
    """End a `python -m` measurement: wait for every rank, flush, and exit without tearing the process
    group down. torch 2.13 with gloo sometimes aborts inside that teardown after the work is done
    ("terminate called without an active exception"); the launcher's ranks end the same way."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
