"""Benchmark of the three expert banks against a dense GEMM of the same FLOPs (lesson 04).

    python -m lessons_lib.lab.bench_experts --out images/experts_gpu.json       # GPU, bf16, realistic shape
    python -m lessons_lib.lab.bench_experts --small                              # CPU-sized, fp32

For balanced routing and for skewed routing (half of the rows to 2 experts), it times the
forward (and forward + backward) of "loop", "bmm" and "grouped" on rows already grouped by
expert, and in the same run two references with the same useful FLOPs: one dense GEMM
[rows, H] @ [H, F·(2 or 3)], and a dense FFN of one expert's shape over all the rows (the same
GEMM chain with its activation, as one expert). Those are the rates the banks should approach. Times are medians of
repeated runs after a warm-up (CUDA events on a GPU).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..moe.config import MoEConfig
from ..moe.experts import activate
from ..moe.experts_batched import BmmExperts, GroupedExperts, flops_per_row
from ..moe.layer import EXPERT_BANKS
from .equivalence import relative_error
from .records import record_header
from .timing import median, timed_runs

BANKS = ("loop", "bmm", "grouped")


def routed_counts(num_experts: int, rows: int, skew: float = 0.0, hot: int = 2) -> torch.Tensor:
    """Rows per expert: a fraction `skew` of all rows goes to the first `hot` experts, the rest is
    spread evenly over the others (skew=0: perfectly balanced)."""
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    if skew == 0.0 or num_experts <= hot:  # no skew, or too few experts to single some out
        hot = 0
    hot_rows = round(rows * skew)
    counts = torch.zeros(num_experts, dtype=torch.long)
    if hot:
        counts[:hot] = hot_rows // hot
        counts[0] += hot_rows - counts[:hot].sum()
    rest, cold = rows - int(counts.sum()), num_experts - hot
    counts[hot:] = rest // cold
    counts[hot: hot + rest % cold] += 1
    return counts


def _time_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median ms of fn() on this process alone (CUDA events on a GPU)."""
    return median(timed_runs(fn, repeats, warmup, device, collective=False))


def gemm_rate(rows: int, hidden: int, ffn: int, device=None, dtype=torch.float32, repeats: int = 20) -> float:
    """GFLOP/s of one [rows, hidden] @ [hidden, ffn] product, the median of `repeats` after a warm-up:
    the rate of one expert's GEMM when it receives `rows` rows."""
    device = device if device is not None else torch.device("cpu")
    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    w = torch.randn(hidden, ffn, device=device, dtype=dtype)
    ms = _time_ms(lambda: a @ w, repeats, 3, device)
    return 2 * rows * hidden * ffn / ms / 1e6


def bench(cfg: MoEConfig, rows: int, skew: float, device: torch.device, repeats: int = 20, warmup: int = 5,
          backward: bool = True) -> dict:
    """One setting: every bank's forward (and fwd+bwd) time and TFLOP/s, and the dense reference."""
    E, H, F = cfg.num_experts, cfg.hidden_dim, cfg.ffn_dim
    dtype = cfg.torch_dtype
    counts = routed_counts(E, rows, skew).to(device)
    useful = rows * flops_per_row(cfg)
    x = torch.randn(rows, H, device=device, dtype=dtype)
    grad = torch.randn(rows, H, device=device, dtype=dtype)
    out = {"skew": skew, "rows": rows, "max_rows_per_expert": int(counts.max()), "useful_gflop": useful / 1e9}
    for name in BANKS:
        bank = EXPERT_BANKS[name](cfg, range(E)).to(device)
        with torch.no_grad():
            fwd = _time_ms(lambda: bank(x, counts), repeats, warmup, device)
        entry = {"forward_ms": fwd, "forward_tflops": useful / fwd / 1e9}
        if backward:
            xg = x.detach().requires_grad_()

            def fwd_bwd():  # fresh gradients each run: accumulating would add a pass over every weight's gradient
                bank.zero_grad(set_to_none=True)
                xg.grad = None
                bank(xg, counts).backward(grad)

            both = _time_ms(fwd_bwd, repeats, warmup, device)
            entry |= {"fwd_bwd_ms": both, "fwd_bwd_tflops": 3 * useful / both / 1e9}
        if isinstance(bank, BmmExperts):
            entry["padding_gflop"] = bank.padding_flops / 1e9
        if isinstance(bank, GroupedExperts):
            entry["path"] = bank.path
        out[name] = entry
    # The dense reference: one expert's FFN over all rows, the same useful FLOPs as one GEMM chain.
    w_in = torch.randn(H, 2 * F if cfg.activation == "swiglu" else F, device=device, dtype=dtype) / H**0.5
    w2 = torch.randn(F, H, device=device, dtype=dtype) / F**0.5

    def dense():
        return activate(x @ w_in, cfg.activation) @ w2

    # And the plainest reference: ONE GEMM with the same FLOPs, [rows, H] @ [H, F·(2 or 3)].
    wide = torch.randn(H, useful // (2 * rows * H), device=device, dtype=dtype) / H**0.5
    with torch.no_grad():
        d = _time_ms(dense, repeats, warmup, device)
        g = _time_ms(lambda: x @ wide, repeats, warmup, device)
    out["dense_ffn"] = {"forward_ms": d, "forward_tflops": useful / d / 1e9}
    out["dense_gemm"] = {"forward_ms": g, "forward_tflops": useful / g / 1e9}
    return out


BF16_COUNTS = [300, 0, 17, 1, 250, 0, 132, 300]  # uneven, empty groups, a group of one row
BF16_TOLERANCE = 2e-2  # the most relative error a bf16 bank may have against fp32 math (tests, lesson 04)


def bf16_errors(bank: str, device, counts: list[int] = BF16_COUNTS, seed: int = 0) -> dict:
    """How far a bank in bf16 is from fp32 math on the same (bf16-rounded) weights and inputs: the max relative
    error of its output and of every gradient (input, w13, w2), 8 experts, H 512, F 256, SwiGLU."""
    cfg16 = MoEConfig(num_experts=len(counts), hidden_dim=512, ffn_dim=256, activation="swiglu", dtype="bfloat16",
                      seed=seed)
    cfg32 = MoEConfig(num_experts=len(counts), hidden_dim=512, ffn_dim=256, activation="swiglu", seed=seed)
    counts_L = torch.tensor(counts, device=device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), 512, generator=g).to(device).bfloat16()
    grad = torch.randn(sum(counts), 512, generator=g).to(device).bfloat16()
    b16 = EXPERT_BANKS[bank](cfg16, range(len(counts))).to(device)
    b32 = EXPERT_BANKS["loop"](cfg32, range(len(counts))).to(device)
    b32.load_state_dict({k: v.float() for k, v in b16.state_dict().items()})
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y16, y32 = b16(x16, counts_L), b32(x32, counts_L)
    (y16 * grad).sum().backward()
    (y32 * grad.float()).sum().backward()
    errors = {"output": relative_error(y16.float(), y32), "grad_input": relative_error(x16.grad.float(), x32.grad)}
    for name, w in b16.named_parameters():
        errors[f"grad_{name}"] = relative_error(w.grad.float(), getattr(b32, name).grad)
    return {"path": b16.path, "errors": errors}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the JSON record here (and a .png beside it)")
    ap.add_argument("--small", action="store_true", help="CPU-sized shape, fp32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bf16-errors", action="store_true", help="instead: every bank's bf16 error against fp32 math")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.bf16_errors:
        record = {**record_header("lessons_lib.lab.bench_experts", device, argv, torchrun=False),
                  "counts": BF16_COUNTS, "banks": {b: bf16_errors(b, device) for b in BANKS}}
        print(json.dumps(record, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        return record
    if args.small or device.type == "cpu":
        cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=1024, activation="swiglu")
        rows = 512
    else:  # the realistic shape: 32 local experts, hidden 4096, FFN 1408, 8192 tokens x top-8
        cfg = MoEConfig(num_experts=32, top_k=8, hidden_dim=4096, ffn_dim=1408, activation="swiglu",
                        dtype="bfloat16")
        rows = 8192 * 8
    record = {**record_header("lessons_lib.lab.bench_experts", device, argv, torchrun=False),
              "config": vars(cfg).copy(), "runs": []}
    # balanced and skewed at full size; then 8x fewer rows, where each expert's GEMMs get small
    for n, skew in ((rows, 0.0), (rows, 0.5), (rows // 8, 0.0)):
        run = bench(cfg, n, skew, device, repeats=args.repeats)
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
        plot(record, Path(args.out).with_suffix(".png"))
    return record


def plot(record: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    runs = record["runs"]
    for ax, key, title in ((axes[0], "forward_tflops", "forward"), (axes[1], "fwd_bwd_tflops", "forward + backward")):
        names = list(BANKS) + (["dense_ffn", "dense_gemm"] if key == "forward_tflops" else [])
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            vals = [run[n].get(key, 0.0) for n in names]
            label = (f"{run['rows']} rows, " + ("balanced" if run["skew"] == 0
                                                else f"{run['skew']:.0%} of rows to 2 experts"))
            ax.bar([j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))], vals, width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("useful TFLOP/s")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    c = record["config"]
    fig.suptitle(f"{record['device']}, {c['dtype']}, {c['num_experts']} experts, H={c['hidden_dim']}, "
                 f"F={c['ffn_dim']}, {c['activation']}; torch {record['torch']}, {record['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
