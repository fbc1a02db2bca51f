"""What a dispatcher costs: the bytes it moves and the training step it takes, on the same setting (lessons 02, 03).

`measure_traffic` reads the `Traffic` record a dispatcher keeps of its last forward (`moe.traffic`);
`compare_dispatchers` times a training step of each dispatcher next to the floors and the collective latency
measured in the same run (`limits`). Under torchrun on GPUs:

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.dispatcher_costs --out images/ep_dispatch_2xh200.json
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.layer import MoELayer
from .limits import collective_latency, step_floors
from .timing import keep_freed_memory, median, train_step_times


def measure_traffic(cfg: MoEConfig, dispatcher: str, tokens: int, group=None, device=None, seed: int = 0) -> list[dict]:
    """One forward of `MoELayer(cfg, dispatcher)` on `tokens` random tokens per rank; for every rank of
    `group`, {"sent", "useful", and the bytes sent per phase}. Every rank calls it together."""
    device = device if device is not None else torch.device("cpu")
    layer = MoELayer(cfg, dispatcher, group=group).to(device)
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    layer(torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype))
    t = layer.dispatcher.traffic
    mine = {"sent": t.sent, "useful": t.useful, **{p: v.sent for p, v in t.phases.items()}}
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    return every


def compare_dispatchers(cfg, tokens: int, dispatchers=("allgather", "alltoall"), experts: str = "loop",
                        steps: int = 30, warmup: int = 10, device=None, group=None) -> dict:
    """Step time (median ms, slowest rank) and bytes sent per rank of each dispatcher on the same
    setting, plus the floors of `step_floors` and what one collective of the dispatch's size costs here
    (`collective_latency`). Every rank of `group` calls it together."""
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


def plot_dispatch_runs(record: dict, path) -> None:
    """Bar chart of a `python -m lessons_lib.lab.dispatcher_costs` record: step time per dispatcher and setting,
    next to the floors measured in the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.2
    xs = range(len(runs))
    series = [("allgather", "C0"), ("alltoall", "C1")]
    for i, (name, colour) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in xs], [r[name]["median_ms"] for r in runs], width, label=name,
               color=colour)
    ax.bar([x + width for x in xs], [r["floors"]["adamw_ms"] + r["floors"]["dense_ffn_ms"] for r in runs],
           width, label="floor: AdamW + dense FFN", color="C7")
    ax.set_xticks(list(xs), [f"{r['tokens_per_rank']} tok/rank\nH={r['config']['hidden_dim']}" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"{record['device']} ×{record['world_size']}, {record['backend']}, torch {record['torch']}, "
                 f"{record['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Under torchrun: time both dispatchers at the published notebook's settings (16 experts, top-2, FFN 4 x
    hidden, fp32) at 32 and 256 tokens per rank (hidden 256) and 1024 (hidden 1024); write JSON (+ PNG)."""
    import argparse
    import json
    from pathlib import Path

    from .records import record_header
    from .torchrun import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    device = init_from_torchrun("lessons_lib.lab.dispatcher_costs")
    if device.type == "cpu":
        keep_freed_memory()
    runs = []
    for tokens, hidden in ((32, 256), (256, 256), (1024, 1024)):
        cfg = MoEConfig(num_experts=16, top_k=2, hidden_dim=hidden, ffn_dim=4 * hidden)
        runs.append(compare_dispatchers(cfg, tokens, steps=args.steps, device=device))
        if dist.get_rank() == 0:
            print(json.dumps(runs[-1]), flush=True)
    if dist.get_rank() == 0:
        record = {**record_header("lessons_lib.lab.dispatcher_costs", device, argv), "runs": runs}
        Path(args.out).write_text(json.dumps(record, indent=1))
        plot_dispatch_runs(record, Path(args.out).with_suffix(".png"))
    leave_torchrun()


if __name__ == "__main__":
    main()
