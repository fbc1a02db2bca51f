"""Fine-grained experts on one GPU (lesson 08): the grouped GEMM's rate as F shrinks, and the shared expert's
side-stream path against the same layer without overlap.

DeepSeekMoE's segmentation keeps parameters and FLOPs: E -> m·E experts, F -> F/m, k -> m·k. Here E·F is fixed
at DeepSeek-V3's 256 × 2048 (H 7168, SwiGLU, bf16) and F goes from 8192 down to 256, with T tokens: every expert
gets T·k/E rows, the same at every F. The bank is the course's `GroupedExperts` (torch._grouped_mm), forward
and backward, timed with CUDA events (median of repeats).

    python -m lessons_lib.lab.granularity --out images/granularity_1xh200.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from ..moe.config import MoEConfig
from ..moe.experts_batched import GroupedExperts, flops_per_row
from ..moe.init import init_full_state_dict
from ..moe.layer import MoELayer
from .records import record_header

EXPERT_WIDTH = 256 * 2048  # E·F of DeepSeek-V3


def time_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _bank_on_device(cfg: MoEConfig, device) -> GroupedExperts:
    """A bank of cfg's experts with random weights drawn on the GPU: the course's per-expert CPU draw of 11·10⁹
    weights would take minutes, and the rate does not depend on the values."""
    bank = GroupedExperts(cfg, range(0))  # no experts drawn, then E of them put in place
    bank.experts = range(cfg.num_experts)
    E, H, F = cfg.num_experts, cfg.hidden_dim, cfg.ffn_dim
    for name, shape in (("w1", (E, H, F)), ("w2", (E, F, H)), ("w3", (E, H, F))):
        w = torch.randn(*shape, device=device, dtype=cfg.torch_dtype) / shape[1] ** 0.5
        setattr(bank, name, torch.nn.Parameter(w))
    return bank


def sweep(hidden: int = 7168, tokens: int = 4096, base_k: int = 8, ffns=(8192, 4096, 2048, 1024, 512, 256)):
    device = torch.device("cuda")
    rows = []
    for F in ffns:
        E, k = EXPERT_WIDTH // F, base_k * 2048 // F
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_dim=hidden, ffn_dim=F, activation="swiglu", dtype="bfloat16")
        bank = GroupedExperts(cfg, range(E)) if E * F * hidden < 2 ** 24 else _bank_on_device(cfg, device)
        bank = bank.to(device)
        M = tokens * k
        sizes = [M // E] * E
        counts = torch.tensor(sizes, device=device)
        x = torch.randn(M, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, hidden, device=device, dtype=torch.bfloat16)
        try:
            fwd = time_ms(lambda: bank(x, counts, sizes))
        except RuntimeError as e:  # a limit of the kernel is a result too (torch 2.11: at most 1024 groups)
            rows.append({"ffn_dim": F, "num_experts": E, "top_k": k, "error": str(e).splitlines()[0]})
            print(rows[-1], flush=True)
            continue
        both = time_ms(lambda: bank(x, counts, sizes).backward(g))
        flops = M * flops_per_row(cfg)
        rows.append({"ffn_dim": F, "num_experts": E, "top_k": k, "rows_per_expert": M // E, "forward_ms": fwd,
                     "forward_tflops": flops / fwd / 1e9, "fwd_bwd_ms": both, "fwd_bwd_tflops": 3 * flops / both / 1e9,
                     "bytes_sent_per_token": k * hidden * 2, "path": bank.path})
        print(rows[-1], flush=True)
    return rows


def side_stream_check(tokens: int = 4096):
    """The shared expert on a side stream (overlap) vs on the current stream: bitwise equal, fp32 and bf16."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    device = torch.device("cuda")
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = MoEConfig(num_experts=16, top_k=4, hidden_dim=1024, ffn_dim=512, activation="swiglu", dtype=dtype,
                        shared_ffn_dim=1024, shared_gate=True)
        sd = init_full_state_dict(cfg)
        x0 = torch.randn(tokens, 1024, device=device).to(cfg.torch_dtype)
        runs, times = [], []
        for overlap in (True, False):
            layer = MoELayer(cfg, "alltoall", "grouped", overlap=overlap).to(device)
            layer.load_full_state_dict(sd)
            x = x0.clone().requires_grad_()
            y, _ = layer(x)
            y.float().sum().backward()
            runs.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
            def step():
                xx = x0.clone().requires_grad_()
                layer(xx)[0].float().sum().backward()
            times.append(time_ms(step))
        out[dtype] = {"bitwise_equal": all(torch.equal(a, b) for a, b in zip(*runs)), "overlap_ms": times[0],
                      "no_overlap_ms": times[1], "path": layer.experts.path}
        print(dtype, out[dtype], flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="images/granularity_1xh200.json")
    a = p.parse_args(argv)
    device = torch.device("cuda")
    record = record_header("lessons_lib.lab.granularity", device, argv, torchrun=False)
    record["side_stream"] = side_stream_check()
    record["sweep"] = sweep()
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
