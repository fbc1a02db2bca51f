"""torch.profiler over training steps of one layer: where a step's time goes (the benchmark suite's --profile;
lessons 03 and 04 quote its tables).

Written by rank 0: the ops by self device time and by self CPU time, the kernels and host syncs per step, and
optionally a Chrome trace of a few forward + backward passes (every rank its own file).
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.layer import MoELayer
from .records import device_name
from .timing import make_adamw, median, timed_runs


def profile_step(cfg: MoEConfig, tokens: int, dispatcher: str, experts: str, device, path, steps: int = 5,
                 trace: str | None = None) -> None:
    """torch.profiler over `steps` training steps (forward, backward, AdamW) of one combination; rank 0 writes
    the ops by self device time and by self CPU time, the count of kernels and host syncs per step, and
    the device's busy time against the wall time. `trace`: also a Chrome trace of 3 forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    layer = MoELayer(cfg, dispatcher, experts).to(device)
    opt = make_adamw(layer.parameters())
    # the input needs a gradient, as in bench_one and inside a model: every backward GEMM runs
    x = torch.randn(tokens, cfg.hidden_dim, device=device, dtype=cfg.torch_dtype, requires_grad=True)

    def fwd_bwd():  # fresh gradients each pass, as in training
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].float().square().mean().backward()

    def step():
        fwd_bwd()
        opt.step()

    for _ in range(3):
        step()
    wall_ms = median(timed_runs(step, steps, 1, device))  # unprofiled: the profiler slows the host
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace:  # forward + backward only, every rank its own file
        with profile(activities=activities) as fb:
            for _ in range(3):
                dist.barrier()
                fwd_bwd()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        fb.export_chrome_trace(str(Path(trace).with_suffix(f".rank{dist.get_rank()}.json")))
    if dist.get_rank() != 0:
        return
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    # a host sync is where the CPU waits for the GPU: .item(), .tolist(), a device-to-host copy all end in one of these
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaEventSynchronize"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    where = device_name(device)
    busy = ""
    if device.type == "cuda":
        busy_ms = device_busy_us(prof.events()) / 1e3 / steps
        busy = (f"device busy per step: {busy_ms:.2f} ms of the {wall_ms:.2f} ms step (median, unprofiled): "
                f"idle {wall_ms - busy_ms:.2f} ms, waiting for the host to queue work\n")
    text = (f"{where} × {dist.get_world_size()}, torch {torch.__version__}, {datetime.date.today().isoformat()}\n"
            f"{dispatcher} + {experts}, {tokens} tokens per rank, {steps} training steps\n"
            f"device kernels per step: {kernels / steps:.0f}; host syncs (cudaStream/Event/DeviceSynchronize) per "
            f"step: {syncs / steps:.1f}\n{busy}\n"
            + events.table(sort_by=sort, row_limit=25) + "\n\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=25))
    Path(path).write_text(text)


def device_time_by_part(fn, device, passes: int = 10, reps: int = 3) -> dict:
    """Where the device's time goes in fn() (one forward + backward of a layer), `passes` calls queued back to back
    as a training loop queues them, no host sync between (lesson 04 reads it from the bench's 1x H200 record):

    queued_ms: wall time per pass, unprofiled (CUDA events around the queue, median of `reps` queues);
    and per pass in one profiled queue: span_ms from its first kernel's start to its last one's end, busy_ms in
    which the device ran something, idle_ms = span_ms - busy_ms in which it waited for the host (the profiler
    slows the host, so an unprofiled queue waits no longer than this), grouped_gemm_ms the kernels of
    `torch._grouped_mm` (the experts' GEMMs), other_ms the rest of busy_ms, and top_ops the ops whose own kernels
    took the most of other_ms."""
    from torch.profiler import ProfilerActivity, profile

    def queue():
        for _ in range(passes):
            fn()

    queue()
    torch.cuda.synchronize(device)
    walls = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        queue()
        end.record()
        torch.cuda.synchronize(device)
        walls.append(start.elapsed_time(end) / passes)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        queue()
        torch.cuda.synchronize(device)
    parts = split_device_time(prof.key_averages(), passes)
    events = prof.events()
    busy = device_busy_us(events) / 1e3 / passes
    span = device_span_us(events) / 1e3 / passes
    return {"passes": passes, "queued_ms": median(walls), "span_ms": span, "busy_ms": busy, "idle_ms": span - busy,
            "grouped_gemm_ms": parts["grouped_gemm_ms"], "other_ms": busy - parts["grouped_gemm_ms"],
            "top_ops": parts["top_ops"]}


def split_device_time(averages, passes: int, top: int = 8) -> dict:
    """From a profile's `key_averages()`: ms per pass of the kernels launched by `aten::_grouped_mm`, and the `top`
    other host-side ops by the device time of the kernels they launched themselves (their self device time:
    a kernel counts under the innermost op around its launch, so nothing counts twice)."""
    own = {}
    for a in averages:
        if a.device_type.name == "CPU":
            us = a.self_device_time_total
            if us > 0:
                own[a.key] = own.get(a.key, 0.0) + us / 1e3 / passes
    grouped = own.pop("aten::_grouped_mm", 0.0)
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return {"grouped_gemm_ms": grouped, "top_ops": {k: v for k, v in ranked}}


def device_busy_us(events) -> float:
    """Microseconds in which the device ran something (a kernel, a copy, a memset): the union of their intervals,
    so that work on two streams at once counts once. Annotations (an optimizer step, a compiled region) are
    device-side ranges around kernels, not work, and are left out."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type.name == "CUDA" and not e.is_user_annotation)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def device_span_us(events) -> float:
    """Microseconds from the first device work's start to the last one's end (annotations left out)."""
    spans = [(e.time_range.start, e.time_range.end) for e in events
             if e.device_type.name == "CUDA" and not e.is_user_annotation]
    return max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0


def op_device_time(table: str, op: str) -> tuple[float, int]:
    """(seconds of self device time, calls) of `op` (say "aten::_grouped_mm") in a profile written by
    `profile_step` (its first table, sorted by device time; lesson 04 reads the committed ones)."""
    fields = next(line for line in table.splitlines() if line.strip().startswith(op + " ")).split()
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", fields[-3]).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit], int(fields[-1])
