"""Fine-grained experts (lesson 08): what DeepSeekMoE's segmentation costs and buys.

Segmenting by m keeps parameters and FLOPs: E -> m·E experts, F -> F/m, k -> m·k (`segment`). It changes
- the traffic: the course's dispatchers send one row per (token, expert) pair, k rows of H elements a token, so
  m times more bytes; a dispatcher that sends a token once per destination rank (DeepEP's) sends one row per
  distinct rank, and that number stops growing at the world size (`distinct_ranks`, `expected_distinct_ranks`,
  `traffic_per_token`, on the CPU);
- the grouped GEMM's rate: the same rows and FLOPs in m times more, m times narrower GEMMs (`sweep`, on one GPU:
  E·F fixed at DeepSeek-V3's 256 × 2048, H 7168, SwiGLU, bf16, F from 8192 down to 256, every expert getting
  T·k/E rows; the course's `GroupedExperts` forward and backward, CUDA events, median of repeats).
`side_stream_check` runs the shared expert's side-stream path against the same layer without overlap on a GPU.

    python -m lessons_lib.lab.granularity --out images/granularity_1xh200.json   (GPU; --plot redraws the figure)
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from ..moe.config import MoEConfig
from ..moe.experts_batched import GroupedExperts, flops_per_row
from ..moe.hash_router import HashRouter
from ..moe.init import expert_weight_shapes, init_full_state_dict
from ..moe.layer import MoELayer
from .records import record_arguments, record_header, redraw_record, write_record

EXPERT_WIDTH = 256 * 2048  # E·F of DeepSeek-V3


def segment(cfg: MoEConfig, m: int) -> MoEConfig:
    """DeepSeekMoE's fine-grained segmentation of cfg by m: m·E experts of width F/m, top m·k."""
    if m < 1 or cfg.ffn_dim % m:
        raise ValueError(f"m must be a positive divisor of ffn_dim={cfg.ffn_dim}, got {m}")
    return dataclasses.replace(cfg, num_experts=cfg.num_experts * m, ffn_dim=cfg.ffn_dim // m, top_k=cfg.top_k * m)


def deepseekmoe(num_experts: int, ffn_dim: int, top_k: int, m: int, shared: int) -> dict:
    """DeepSeekMoE's two steps (Dai et al. 2024, §3.1 and §3.2) from E experts of width F, top-k: segment every
    expert into m of width F/m and choose m·k of them (§3.1); then isolate K_s = `shared` of the fine experts as
    shared experts every token passes, and route among the other m·E − K_s, choosing m·k − K_s (§3.2). Parameters
    and FLOPs per token stay those of the coarse layer. Returns the sizes, and "activated" = experts a token passes."""
    if m < 1 or ffn_dim % m:
        raise ValueError(f"m must be a positive divisor of ffn_dim={ffn_dim}, got {m}")
    if not 0 <= shared < m * top_k:
        raise ValueError(f"shared must leave at least one routed expert to choose: 0 <= shared < m·k = {m * top_k}")
    return {"routed_experts": m * num_experts - shared, "ffn_dim": ffn_dim // m, "top_k": m * top_k - shared,
            "shared_experts": shared, "shared_ffn_dim": shared * (ffn_dim // m), "activated": m * top_k}


def distinct_ranks(expert_ids_Tk: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """[T] how many different ranks each token's k experts live on (rank r owns experts r·E/N … (r+1)·E/N − 1)."""
    if num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by world_size ({world_size})")
    rank_Tk = expert_ids_Tk // (num_experts // world_size)
    hit_TN = torch.zeros(expert_ids_Tk.shape[0], world_size, dtype=torch.bool, device=expert_ids_Tk.device)
    hit_TN.scatter_(1, rank_Tk, True)
    return hit_TN.sum(1)


def expected_distinct_ranks(num_experts: int, top_k: int, world_size: int) -> float:
    """The mean of `distinct_ranks` when each token's k distinct experts are drawn uniformly at random: a rank is
    missed when all k fall among the other ranks' E − E/N experts, so N·(1 − C(E − E/N, k) / C(E, k))."""
    others = num_experts - num_experts // world_size
    return world_size * (1 - math.comb(others, top_k) / math.comb(num_experts, top_k))


def traffic_per_token(cfg: MoEConfig, world_size: int, ms=(1, 2, 4, 8), tokens: int = 4096,
                      bytes_per_element: int = 2) -> list[dict]:
    """For each segmentation m of cfg: rows and bytes a token's dispatch sends, one row per expert (the course's
    dispatchers) and one per distinct rank (a dispatcher that deduplicates, as DeepEP's does), measured on
    `tokens` tokens routed by the hash router (uniform, distinct experts), with the uniform formula beside."""
    ids = torch.arange(tokens)
    rows = []
    for m in ms:
        c = segment(cfg, m)
        routing = HashRouter(c)(torch.zeros(tokens, 1), ids)
        ranks = distinct_ranks(routing.expert_ids, c.num_experts, world_size).float().mean().item()
        row_bytes = c.hidden_dim * bytes_per_element
        rows.append({"m": m, "num_experts": c.num_experts, "ffn_dim": c.ffn_dim, "top_k": c.top_k,
                     "E_times_F": c.num_experts * c.ffn_dim, "k_times_F": c.top_k * c.ffn_dim,
                     "bytes_row_per_expert": c.top_k * row_bytes, "distinct_ranks": ranks,
                     "expected_distinct_ranks": expected_distinct_ranks(c.num_experts, c.top_k, world_size),
                     "bytes_row_per_rank": ranks * row_bytes})
    return rows


def time_ms(fn, repeats: int = 10, warmup: int = 3, calls: int = 1) -> float:
    """Median GPU milliseconds of one call of fn, by CUDA events. calls > 1: the events enclose that many calls
    back to back, so the host's launching overlaps the GPU's work, as in a model's forward; calls = 1 also
    counts the time the GPU waits for the first launch."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bank_on_device(cfg: MoEConfig, device, bank_class=GroupedExperts) -> GroupedExperts:
    """A bank of cfg's experts with random weights drawn on the GPU: the course's per-expert CPU draw of 11·10⁹
    weights would take minutes, and the rate does not depend on the values."""
    bank = bank_class(cfg, range(0))  # no experts drawn, then E of them put in place
    bank.experts = range(cfg.num_experts)
    for name, shape in expert_weight_shapes(cfg).items():
        w = torch.randn(cfg.num_experts, *shape, device=device, dtype=cfg.torch_dtype) / shape[0] ** 0.5
        setattr(bank, name, torch.nn.Parameter(w))
    return bank


def sweep(hidden: int = 7168, tokens: int = 4096, base_k: int = 8, ffns=(8192, 4096, 2048, 1024, 512, 256)):
    device = torch.device("cuda")
    rows = []
    for F in ffns:
        E, k = EXPERT_WIDTH // F, base_k * 2048 // F
        cfg = MoEConfig(num_experts=E, top_k=k, hidden_dim=hidden, ffn_dim=F, activation="swiglu", dtype="bfloat16")
        bank = GroupedExperts(cfg, range(E)) if E * F * hidden < 2 ** 24 else bank_on_device(cfg, device)
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
        weights = list(bank.parameters())
        # autograd.grad returns fresh gradients: .backward() would add each repeat's into the last ones, an extra
        # read and write of every weight gradient that is not part of a training step's backward
        both = time_ms(lambda: torch.autograd.grad(bank(x, counts, sizes), [x, *weights], g))
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


def plot_record(record: dict):
    """The sweep of a granularity record: forward and forward+backward TFLOP/s against F, with the widths the
    kernel refused marked. Returns the figure."""
    import matplotlib.pyplot as plt

    ok = [r for r in record["sweep"] if "error" not in r]
    failed = [r for r in record["sweep"] if "error" in r]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    F = [r["ffn_dim"] for r in ok]
    ax.plot(F, [r["forward_tflops"] for r in ok], marker="o", label="forward")
    ax.plot(F, [r["fwd_bwd_tflops"] for r in ok], marker="s", label="forward + backward")
    for r in failed:
        ax.axvline(r["ffn_dim"], color="tab:red", ls=":", lw=1)
        ax.text(r["ffn_dim"], 10, f"E={r['num_experts']}:\nrefused ", color="tab:red", fontsize=8, ha="right")
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    ax.set_xticks([r["ffn_dim"] for r in record["sweep"]],
                  [f"F={r['ffn_dim']}\nE={r['num_experts']}, k={r['top_k']}" for r in record["sweep"]], fontsize=7)
    ax.set_ylim(0, None)
    ax.set_xlabel("expert width F (narrower to the right), with the experts E and top-k that keep E·F and k·F")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"grouped GEMM, E·F = 256·2048, H 7168, bf16: {record['device']}, torch {record['torch']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None):
    a = record_arguments(__doc__.splitlines()[0], "images/granularity_1xh200.json", argv)
    if a.plot:
        return redraw_record(a.out, plot_record)
    device = torch.device("cuda")
    record = record_header("lessons_lib.lab.granularity", device, argv, torchrun=False)
    record["side_stream"] = side_stream_check()
    record["sweep"] = sweep()
    write_record(record, a.out)


if __name__ == "__main__":
    main()
