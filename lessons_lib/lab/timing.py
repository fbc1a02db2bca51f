"""How the course times things (lesson 02): medians of repeated runs, the slowest rank's time.

`timed_runs` times any function; `train_step_times` a training step of a layer (forward, backward, AdamW).
Before each run the ranks meet at a barrier, so they start together; a step lasts as long as its slowest
rank, because the collectives make every rank wait for the last one. We report the median over runs after a
warm-up (the first runs pay for allocations and lazy initialisation). What the machine allows at best, measured
in the same run, is in `limits`.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import statistics
import time

import torch
import torch.distributed as dist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (Linux only).

    PyTorch's CPU allocator calls malloc directly. Gradients of stacked expert weights are
    megabytes each and freshly allocated every step; by default glibc hands such blocks back to the
    OS when they are freed, so every step page-faults them in again (measured here: a third of a
    CPU training step). PyTorch's CPU performance guide suggests a caching allocator (jemalloc,
    tcmalloc) for the same reason; these two mallopt settings are the no-install version.
    Returns whether the settings were applied.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None or "libc" not in libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        big = 1 << 30
        return bool(libc.mallopt(M_MMAP_THRESHOLD, big)) and bool(libc.mallopt(M_TRIM_THRESHOLD, big))
    except (OSError, AttributeError):
        return False


def make_adamw(params, lr: float = 1e-3) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it: one pass over each parameter instead of several."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=True)


def train_step_times(layer, tokens: int, steps: int = 30, warmup: int = 5, group=None, seed: int = 0,
                     collective: bool | None = None, x: torch.Tensor | None = None,
                     after_backward=None) -> list[float]:
    """Milliseconds per training step (forward, backward, AdamW) of `layer` on `tokens` random tokens
    (or on the given inputs `x`), the slowest rank's time for each of `steps` steps after `warmup` untimed ones.

    collective: whether the ranks must agree on each step's time (default: when torch.distributed
    is initialized); every rank of `group` then has to call this together.
    after_backward: called between backward and the optimizer step (lesson 11: `MoELayer.sum_replica_grads`).
    """
    device = next(layer.parameters()).device
    dtype = layer.cfg.torch_dtype
    g = torch.Generator().manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0))
    if x is None:
        x = torch.randn(tokens, layer.cfg.hidden_dim, generator=g).to(device, dtype)
    target = torch.randn(x.shape[0], layer.cfg.hidden_dim, generator=g).to(device, dtype)
    opt = make_adamw(layer.parameters())

    def step():
        y, aux = layer(x)
        loss = torch.nn.functional.mse_loss(y, target) + 0.01 * aux.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()

    return timed_runs(step, steps, warmup, device, group, collective)


def timed_runs(fn, steps: int, warmup: int, device, group=None, collective: bool | None = None) -> list[float]:
    """Milliseconds of each of `steps` calls of fn() after `warmup` untimed ones (CUDA events on a GPU,
    the wall clock on a CPU). With `collective` (default: when torch.distributed is initialized) the ranks
    of `group` start each call together at a barrier and every rank gets the slowest rank's time of each call."""
    collective = dist.is_initialized() if collective is None else collective
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        _sync(device)
        if collective:
            dist.barrier(group=group)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        if cuda:
            end.record()
        _sync(device)
        if i >= warmup:
            times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3)
    if collective:
        t = torch.tensor(times, dtype=torch.float64, device=device if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times = t.tolist()
    return times


def median(values) -> float:
    return statistics.median(values)


def rank_tokens(hidden_dim: int, tokens: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """[tokens, hidden_dim] random inputs, different on every rank (the seed shifted by the rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    x = torch.randn(tokens, hidden_dim, generator=torch.Generator().manual_seed(seed + 7919 * rank))
    return x.to(device, dtype)


@contextlib.contextmanager
def own_core():
    """Pin this rank's thread to a core of its own while the block runs (the rank's LOCAL_RANK-th of the cores this
    process may use), where every rank of this machine can have one; else do nothing. Two ranks left to the
    scheduler on two cores are moved about, which spreads step times by tens of percent on the course's CPU
    machine (lesson 09 measures with it)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    if len(allowed) < local_ranks:
        yield
        return
    os.sched_setaffinity(0, {allowed[int(os.environ.get("LOCAL_RANK", 0)) % len(allowed)]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
