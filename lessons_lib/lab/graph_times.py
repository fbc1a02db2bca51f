"""What one CUDA graph per training step buys, measured (lesson 05).

`step_times` times the final layer three ways: dropless and eager (lesson 03), with lesson 05's static shapes
eagerly, and the static step replayed from one CUDA graph (`moe.cuda_graph.GraphedTrainStep`);
`compare_graph_with_eager` checks that replayed steps equal eager ones. On a GPU:

    torchrun --nproc-per-node 1 -m lessons_lib.lab.graph_times --experts grouped --out images/cuda_graph_1xh200.json
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.capacity import expert_capacity, padding_fraction, static_dropless
from ..moe.config import MoEConfig
from ..moe.cuda_graph import GraphedTrainStep, eager_train_step
from ..moe.layer import MoELayer
from .equivalence import relative_error
from .timing import median, timed_runs, train_step_times


def compare_graph_with_eager(cfg: MoEConfig, tokens: int, device, steps: int = 3, experts: str = "grouped",
                             group=None, seed: int = 0) -> dict:
    """Run `steps` training steps of the static layer eagerly and as graph replays, from the same weights on the
    same tokens; return the largest relative difference of the weights after them, and of the losses."""
    cfg = static_dropless(cfg) if not cfg.pad_to_capacity else cfg
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    target = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    eager = MoELayer(cfg, "alltoall", experts, group).to(device)
    graphed = MoELayer(cfg, "alltoall", experts, group).to(device)
    graphed.load_state_dict(eager.state_dict())
    eager_step, graph_step = eager_train_step(eager, x, target), GraphedTrainStep(graphed, x, target)
    loss_errors = [relative_error(graph_step().clone(), eager_step()) for _ in range(steps)]
    weight_errors = {n: relative_error(p, dict(eager.named_parameters())[n]) for n, p in graphed.named_parameters()}
    return {"loss": max(loss_errors), "weights": max(weight_errors.values()), "per_weight": weight_errors}


def step_times(cfg: MoEConfig, tokens: int, device, steps: int = 50, warmup: int = 10, experts: str = "grouped",
               group=None) -> dict:
    """Median ms per training step (slowest rank) of the final layer ('alltoall' + `experts`) three ways:
    dropless and eager (lesson 03's layer), static and eager, static and replayed from a CUDA graph."""
    dropless = MoELayer(cfg, "alltoall", experts, group).to(device)
    out = {"dropless_eager_ms": median(train_step_times(dropless, tokens, steps, warmup, group))}
    del dropless
    static = static_dropless(cfg)
    layer = MoELayer(static, "alltoall", experts, group).to(device)
    out["static_eager_ms"] = median(train_step_times(layer, tokens, steps, warmup, group))
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x, target = (torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype) for _ in range(2))
    out["graph_ms"] = median(timed_runs(GraphedTrainStep(layer, x, target), steps, warmup, device, group))
    out["capacity"] = expert_capacity(static, tokens)
    out["padding_fraction"] = padding_fraction(static, tokens)
    return out


def plot_step_times(record: dict, path) -> None:
    """Training step time of each bank three ways (dropless eager, static eager, static graph), from a record
    with `banks` (images/cuda_graph_*.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banks = list(record["banks"])
    ways = (("dropless_eager_ms", "dropless, eager (lesson 03)"), ("static_eager_ms", "static shapes, eager"),
            ("graph_ms", "static shapes, one CUDA graph"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (key, label) in enumerate(ways):
        vals = [record["banks"][b][key] for b in banks]
        bars = ax.bar([j + (i - 1) * 0.27 for j in range(len(banks))], vals, 0.27, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(banks)), [f"alltoall + {b}" for b in banks])
    ax.set(ylabel="ms per training step (median)",
           title=f"{record['device']} × {record['world_size']}, {record['tokens_per_rank']} tokens per rank, "
                 f"{record['config']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """torchrun --nproc-per-node N -m lessons_lib.lab.graph_times [--tokens 32] [--out FILE.json]: the bench's small
    shape, timed three ways (`step_times`), and a graph checked against eager steps (`compare_graph_with_eager`)."""
    import argparse
    import json

    from .records import record_header
    from .shapes import SHAPES
    from .torchrun import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    ap.add_argument("--experts", default="grouped")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", help="write the JSON record here")
    args = ap.parse_args(argv)
    device = init_from_torchrun("lessons_lib.lab.graph_times")
    cfg = SHAPES["small"][0]
    record = {**record_header("lessons_lib.lab.graph_times", device, argv), "config": vars(cfg).copy(),
              "tokens_per_rank": args.tokens, "experts": args.experts}
    check = compare_graph_with_eager(cfg, args.tokens, device, experts=args.experts)
    record["graph_vs_eager_max_rel_error"] = {"loss": check["loss"], "weights": check["weights"]}
    record.update(step_times(cfg, args.tokens, device, args.steps, args.warmup, args.experts))
    if dist.get_rank() == 0:
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
    leave_torchrun()


if __name__ == "__main__":
    main()
