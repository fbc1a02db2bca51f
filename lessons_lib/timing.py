"""Timing a training step of a layer, the way the lessons report it (lesson 02).

A step is forward, backward and an AdamW update. Before each step the ranks meet at a
barrier, so they start together; a step lasts as long as its slowest rank, because
the collectives make every rank wait for the last one. We report the median over steps
after a warm-up (the first steps pay for allocations and lazy initialisation).
"""
from __future__ import annotations

import ctypes
import ctypes.util
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
                     collective: bool | None = None, x: torch.Tensor | None = None) -> list[float]:
    """Milliseconds per training step (forward, backward, AdamW) of `layer` on `tokens` random tokens
    (or on the given inputs `x`), the slowest rank's time for each of `steps` steps after `warmup` untimed ones.

    collective: whether the ranks must agree on each step's time (default: when torch.distributed
    is initialized); every rank of `group` then has to call this together.
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
    process asleep in a collective is slow to wake (lesson 03 measures about one call in ten waiting ms), and a
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


def median(values) -> float:
    return statistics.median(values)


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
    x = torch.randn(rows, H, device=device, dtype=dtype, requires_grad=input_grad)
    w1 = torch.randn(H, F, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(F, H, device=device, dtype=dtype, requires_grad=True)
    w3 = torch.randn(H, F, device=device, dtype=dtype, requires_grad=True)
    swiglu = cfg.activation == "swiglu"

    def dense():
        x.grad = w1.grad = w2.grad = w3.grad = None  # fresh gradients, as a training step has
        h = torch.nn.functional.silu(x @ w1) * (x @ w3) if swiglu else torch.nn.functional.gelu(x @ w1)
        (h @ w2).sum().backward()

    return median(timed_runs(dense, steps, warmup, device, group))


def compare_dispatchers(cfg, tokens: int, dispatchers=("allgather", "alltoall"), experts: str = "loop",
                        steps: int = 30, warmup: int = 10, device=None, group=None) -> dict:
    """Step time (median ms, slowest rank) and bytes sent per rank of each dispatcher on the same
    setting, plus the floors of `step_floors` and what one collective of the dispatch's size costs here
    (`collective_latency`). Every rank of `group` calls it together."""
    from .layer import MoELayer

    device = device if device is not None else torch.device("cpu")
    out = {"tokens_per_rank": tokens, "world_size": dist.get_world_size(group), "config": vars(cfg).copy()}
    for name in dispatchers:
        layer = MoELayer(cfg, name, experts, group=group).to(device)
        times = train_step_times(layer, tokens, steps=steps, warmup=warmup, group=group)
        traffic = torch.tensor([layer.dispatcher.traffic.sent, layer.dispatcher.traffic.useful],
                               dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(traffic, op=dist.ReduceOp.MAX, group=group)
        out[name] = {"median_ms": median(times), "p10_ms": sorted(times)[len(times) // 10],
                     "p90_ms": sorted(times)[(9 * len(times)) // 10],
                     "sent_bytes_max_rank": traffic[0].item(), "useful_bytes_max_rank": traffic[1].item()}
    rows = tokens * cfg.top_k  # the rows one rank's experts process on average, balanced
    out["floors"] = step_floors(layer, rows, steps=steps, warmup=5, group=group)
    out["collective"] = collective_latency(rows * cfg.hidden_dim * cfg.torch_dtype.itemsize, device, group=group)
    return out


# The published notebook this course grew out of (padded all_gather, Python loops over tokens and
# experts, fp32), forward + backward + AdamW, as measured by the course authors (the course's design brief):
# 16 experts, top-2, FFN 4 x hidden, 2 ranks; key: (machine, tokens per rank, hidden).
PUBLISHED_STEP_MS = {
    ("cpu-2proc-gloo", 32, 256): 33.5,
    ("cpu-2proc-gloo", 256, 256): 88.0,
    ("2xH200-nccl", 32, 256): 14.1,
    ("2xH200-nccl", 256, 256): 46.0,
    ("2xH200-nccl", 1024, 1024): 196.0,
}


def plot_dispatch_runs(record: dict, path) -> None:
    """Bar chart of a `python -m lessons_lib.timing` record: step time per dispatcher and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.2
    xs = range(len(runs))
    machine = record.get("published_key")
    series = [("allgather", "C0"), ("alltoall", "C1")]
    for i, (name, colour) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in xs], [r[name]["median_ms"] for r in runs], width, label=name, color=colour)
    ax.bar([x + 0.5 * width for x in xs], [r["floors"]["adamw_ms"] + r["floors"]["dense_ffn_ms"] for r in runs],
           width, label="floor: AdamW + dense FFN", color="C7")
    pub = [PUBLISHED_STEP_MS.get((machine, r["tokens_per_rank"], r["config"]["hidden_dim"])) for r in runs]
    ax.bar([x + 1.5 * width for x in xs], [p or 0 for p in pub], width, label="published notebook", color="C3")
    ax.set_xticks(list(xs), [f"{r['tokens_per_rank']} tok/rank\nH={r['config']['hidden_dim']}" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"{record['device']} ×{record['world_size']}, {record['backend']}, torch {record['torch']}, {record['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Under torchrun: time both dispatchers at the published notebook's settings, write JSON (+ PNG).

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.timing --out images/ep_dispatch_2xh200.json
    """
    import argparse
    import datetime
    import json
    import sys
    from pathlib import Path

    from .config import MoEConfig
    from .distributed import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--published-key", default="2xH200-nccl")
    args = ap.parse_args(argv)
    device = init_from_torchrun()
    backend = dist.get_backend()
    if device.type == "cpu":
        keep_freed_memory()
    rank = dist.get_rank()
    runs = []
    for tokens, hidden in ((32, 256), (256, 256), (1024, 1024)):
        cfg = MoEConfig(num_experts=16, top_k=2, hidden_dim=hidden, ffn_dim=4 * hidden)
        runs.append(compare_dispatchers(cfg, tokens, steps=args.steps, device=device))
        if rank == 0:
            print(json.dumps(runs[-1]), flush=True)
    if rank == 0:
        record = {
            "device": torch.cuda.get_device_name(device) if backend == "nccl" else "cpu",
            "world_size": dist.get_world_size(), "backend": backend, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "published_key": args.published_key,
            "command": f"torchrun --standalone --nproc-per-node {dist.get_world_size()} -m lessons_lib.timing "
                       + " ".join(sys.argv[1:]),
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(record, indent=1))
        plot_dispatch_runs(record, Path(args.out).with_suffix(".png"))
    leave_torchrun()


if __name__ == "__main__":
    main()
