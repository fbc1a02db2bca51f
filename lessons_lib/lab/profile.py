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


def op_device_time(table: str, op: str) -> tuple[float, int]:
    """(seconds of self device time, calls) of `op` (say "aten::_grouped_mm") in a profile written by
    `profile_step` (its first table, sorted by device time; lesson 04 reads the committed ones)."""
    fields = next(line for line in table.splitlines() if line.strip().startswith(op + " ")).split()
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", fields[-3]).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit], int(fields[-1])
