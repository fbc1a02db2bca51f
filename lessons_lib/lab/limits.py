"""The machine's limits, measured in the same run as the layer they are compared with (lessons 02 to 04).

A step time alone says little; next to what this machine can do at best it says how far off it is:
  - `adamw_ms` + `dense_ffn_ms`: one AdamW update of a rank's weights and one dense FFN doing the rank's expert
    FLOPs: no training step of the layer can take less than their sum here (`step_floors`);
  - `grouped_gemms_ms`: the expert GEMMs alone on rows already grouped, what the layer adds around them excluded;
  - `alltoall_bus_bandwidth`: one all_to_all_single of the dispatch's size, as fast as the link allows;
  - `collective_latency`: one all_to_all of that size back to back, and right after compute, as in a step.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .timing import _sync, make_adamw, median, timed_runs


def step_floors(layer, rows: int, steps: int = 30, warmup: int = 5, group=None) -> dict:
    """Two limits measured on this machine, in the same run as the layer's step time:

    adamw_ms: one fused AdamW update of this rank's parameters alone (gradients present);
    dense_ffn_ms: forward + backward of ONE dense FFN of the expert's shape over `rows` rows,
        i.e. the same FLOPs as this rank's experts, as one big GEMM chain instead of many small ones.
    No training step of this layer can take less than their sum on this machine.
    """
    device = next(layer.parameters()).device
    # train_step_times' inputs need no gradient, so the layer skips the input-side backward GEMMs: so does the floor
    return {"adamw_ms": adamw_ms(layer, steps, warmup, group),
            "dense_ffn_ms": dense_ffn_ms(layer.cfg, rows, device, steps, warmup, group, input_grad=False)}


def adamw_ms(layer, steps: int = 30, warmup: int = 5, group=None) -> float:
    """Median ms of one fused AdamW update of copies of this rank's parameters of `layer`, gradients present:
    a floor for any training step of it (on a CPU this pass over weights, gradients and two moments is
    bound by memory bandwidth)."""
    device = next(layer.parameters()).device
    params = [torch.nn.Parameter(p.detach().clone()) for p in layer.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make_adamw(params)
    return median(timed_runs(opt.step, steps, warmup, device, group))


def dense_ffn_ms(cfg, rows: int, device, steps: int = 30, warmup: int = 5, group=None,
                 input_grad: bool = True) -> float:
    """Median ms of forward + backward of ONE dense FFN of an expert's shape over `rows` rows: the
    FLOPs of `rows` expert rows as one big GEMM chain, the rate the expert banks should approach.

    input_grad: whether backward also computes the input's gradient, as a layer inside a model does
    (3 x the forward FLOPs); without it the first GEMMs' input gradients are skipped (SwiGLU: 7 of 9
    GEMMs, GELU: 5 of 6). It must match the layer it is compared with."""
    H, F, dtype = cfg.hidden_dim, cfg.ffn_dim, cfg.torch_dtype
    swiglu = cfg.activation == "swiglu"
    x = torch.randn(rows, H, device=device, dtype=dtype, requires_grad=input_grad)
    w_in = torch.randn(H, 2 * F if swiglu else F, device=device, dtype=dtype, requires_grad=True)  # w13 or w1
    w2 = torch.randn(F, H, device=device, dtype=dtype, requires_grad=True)

    def dense():
        x.grad = w_in.grad = w2.grad = None  # fresh gradients, as a training step has
        h = x @ w_in
        h = torch.nn.functional.silu(h[:, :F]) * h[:, F:] if swiglu else torch.nn.functional.gelu(h)
        (h @ w2).sum().backward()

    return median(timed_runs(dense, steps, warmup, device, group))


def equal_split(rows: int, groups: int) -> list[int]:
    """`rows` split into `groups` groups of as equal sizes as the total allows."""
    return [rows // groups + (i < rows % groups) for i in range(groups)]


def grouped_gemms_ms(cfg, rows: int, device, steps: int = 30, warmup: int = 5, group=None,
                     with_activation: bool = False, sizes: list[int] | None = None) -> float | None:
    """Median ms of forward + backward (input gradient included) of the grouped bank's GEMMs alone, on `rows` rows
    already grouped by expert in equal groups: no routing, no dispatch, no combine. What the layer adds around its
    experts is its time minus this (lesson 04). None where `torch._grouped_mm` has no fast kernel (it needs bf16
    on a Hopper-class GPU).

    with_activation False: the GEMM kernels alone, 2 forward + 4 backward `torch._grouped_mm` calls on fixed inputs
    (the bank's two matrices: w13 [E, H, 2F] for swiglu, or w1, and w2); True: the bank's math under autograd as
    plain ops (the GEMMs and the activation between them).
    sizes: the rows of each group instead (one per expert held, summing to `rows`), say the counts a router gave:
    the kernel works in tiles of rows, so unequal groups leave more of them part-empty than equal ones."""
    from ..moe.experts_batched import grouped_mm_support

    if sizes is not None and (sum(sizes) != rows or min(sizes, default=-1) < 0):
        raise ValueError(f"sizes must be one row count >= 0 per group, summing to rows={rows}; got {sizes}")
    if not grouped_mm_support(device, cfg.torch_dtype, cfg)[0]:
        return None
    H, F, dtype = cfg.hidden_dim, cfg.ffn_dim, cfg.torch_dtype
    swiglu = cfg.activation == "swiglu"
    F_in = 2 * F if swiglu else F  # the first matrix's width: w13 holds the gate and the up projection
    sizes = equal_split(rows, cfg.num_experts) if sizes is None else sizes
    E = len(sizes)
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    x = torch.randn(rows, H, device=device, dtype=dtype)
    w_in = torch.randn(E, H, F_in, device=device, dtype=dtype) / H ** 0.5
    w2 = torch.randn(E, F, H, device=device, dtype=dtype) / F ** 0.5
    grad_y = torch.randn(rows, H, device=device, dtype=dtype)

    def mm(a, b):
        return torch._grouped_mm(a, b, offs=offs)

    if with_activation:
        leaves = [t.requires_grad_() for t in (x, w_in, w2)]

        def bank():
            for t in leaves:
                t.grad = None
            h = mm(x, w_in)
            h = torch.nn.functional.silu(h[:, :F]) * h[:, F:] if swiglu else torch.nn.functional.gelu(h)
            mm(h, w2).backward(grad_y)

        return median(timed_runs(bank, steps, warmup, device, group))
    h, grad_h = torch.randn(rows, F, device=device, dtype=dtype), torch.randn(rows, F_in, device=device, dtype=dtype)

    def gemms():
        mm(x, w_in)
        mm(h, w2)
        mm(grad_y, w2.transpose(1, 2))  # grad h
        mm(h.t(), grad_y)  # grad w2
        mm(grad_h, w_in.transpose(1, 2))  # grad x
        mm(x.t(), grad_h)  # grad w13 (w1)

    return median(timed_runs(gemms, steps, warmup, device, group))


def collective_latency(nbytes: int, device, steps: int = 100, warmup: int = 10, group=None) -> dict:
    """What one all_to_all_single of `nbytes` per rank costs, in ms:

    back_to_back_ms: median (slowest rank), calls issued one after the other: the collective's own cost;
    after_compute_ms, after_compute_p90_ms: median and 90th percentile when every rank first does the same
        matrix work (a few ms on one CPU core), as the ranks of a training step arrive at each collective.
        Counted from the moment the last rank arrives until every rank is done, so no rank's wait for a
        slower rank's work is in it;
    arrival_spread_ms: median time between the first and the last rank's arrival.
    The last two compare clocks across ranks: the ranks must share one machine (torchrun --standalone).
    On a small virtual machine the exchange after compute sometimes takes many times its back-to-back cost, as a
    process asleep in a collective is slow to wake (the README's appendix on the course's CI machine), and a
    training step risks it at each of its collectives."""
    N = dist.get_world_size(group)
    send = torch.zeros(max(N, nbytes // 4 // N * N), device=device)
    recv = torch.empty_like(send)
    work = torch.randn(384, 384, generator=torch.Generator().manual_seed(0)).to(device)

    def exchange():
        dist.all_to_all_single(recv, send, group=group)

    back_to_back = median(timed_runs(exchange, steps, warmup, device, group))
    arrive, done = [], []
    for _ in range(warmup + steps):
        for _ in range(4):
            work @ work  # the same on every rank
        _sync(device)
        arrive.append(time.perf_counter())
        exchange()
        _sync(device)
        done.append(time.perf_counter())
    on = device if device.type == "cuda" else "cpu"
    t = torch.tensor([arrive[warmup:], done[warmup:]], dtype=torch.float64, device=on)
    latest, earliest = t.clone(), t[0].clone()
    dist.all_reduce(latest, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(earliest, op=dist.ReduceOp.MIN, group=group)
    after = sorted(((latest[1] - latest[0]) * 1e3).tolist())  # last arrival -> every rank done
    return {"bytes_per_rank": send.numel() * 4, "back_to_back_ms": back_to_back,
            "after_compute_ms": median(after), "after_compute_p90_ms": after[(9 * len(after)) // 10],
            "arrival_spread_ms": median(((latest[0] - earliest) * 1e3).tolist())}




def alltoall_bus_bandwidth(nbytes: int, device, steps: int = 20, warmup: int = 5, group=None) -> dict:
    """all_to_all_single of `nbytes` per rank split evenly over the ranks: median ms, and bus bandwidth
    = bytes each rank sends to other ranks / time (nccl-tests' definition for all-to-all)."""
    N = dist.get_world_size(group)
    elems = max(N, nbytes // 2 // N * N)  # bf16-sized elements, divisible by N
    send = torch.empty(elems, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    ms = median(timed_runs(lambda: dist.all_to_all_single(recv, send, group=group), steps, warmup, device, group))
    moved = elems * 2 * (N - 1) / N
    return {"bytes_per_rank": elems * 2, "ms": ms, "busbw_gbps": moved / ms / 1e6 if N > 1 else None}
