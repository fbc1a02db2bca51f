"""Ranks, world size and who owns which experts (lesson 00).

A process group is a set of ranks that run collectives together; `None` means the
default group of all ranks. Expert parallelism gives rank r of an N-rank group the
contiguous block of experts r·E/N … (r+1)·E/N − 1.
"""
from __future__ import annotations

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
