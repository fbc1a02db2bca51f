"""Expert parallelism against tensor parallelism on the same batch, measured (lesson 07).

`measure_ep_vs_tp` runs on every rank of a group: it counts the bytes each variant really sends
(balanced routing, so the model of `comm_model` applies exactly), times a training step of each
(with the router's own routing of the same tokens), and records the shape of each rank's expert
GEMMs. Under torchrun on GPUs:

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.ep_vs_tp --out images/ep_vs_tp_2xh200.json
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.layer import MoELayer
from ..moe.router import Routing
from .comm_model import ep_bytes_per_rank, tp_bytes_per_rank
from .timing import median, train_step_times


def balanced_routing(tokens: int, cfg: MoEConfig, device) -> Routing:
    """Token t picks experts t·k, t·k+1, … (mod E): with T·k a multiple of E every expert, and so
    every rank, receives exactly the same number of rows."""
    k, E = cfg.top_k, cfg.num_experts
    ids = (torch.arange(tokens * k, device=device) % E).view(tokens, k)
    probs = torch.full((tokens, E), 1.0 / E, device=device)
    return Routing(ids, torch.full((tokens, k), 1.0 / k, device=device), probs, probs.log())


def measure_ep_vs_tp(cfg: MoEConfig, tokens: int, experts: str = "loop", group=None, device=None,
                     steps: int = 20, warmup: int = 5, same_global_batch: bool = False) -> dict:
    """Counted vs modelled bytes per rank, step time (median ms, slowest rank) and per-rank expert GEMM
    shapes of EP ("alltoall") and TP ("tp"), `tokens` tokens on every EP rank.

    same_global_batch: False gives every TP rank `tokens` tokens too (the same work per rank). True compares
    the two layouts of the same N ranks and the same batch, as at a fixed world size: EP's N ranks each hold
    their own `tokens`, while TP's ranks all run the group's whole batch of N · tokens (tensor parallelism
    leaves no data parallelism inside the group). Then EP sends k/N of TP's bytes. Rank 0 prints a line per layout
    as it goes."""
    device = device if device is not None else torch.device("cpu")
    rank, N = rank_and_size(group)
    if (tokens * cfg.top_k) % cfg.num_experts:
        raise ValueError("tokens · top_k must be a multiple of num_experts for exactly balanced routing")
    b = torch.empty(0, dtype=cfg.torch_dtype).element_size()
    out = {"group_size": N, "tokens_per_rank": tokens, "bytes_per_element": b, "experts": experts,
           "same_global_batch": same_global_batch, "config": vars(cfg).copy()}
    for name, dispatcher in (("ep", "alltoall"), ("tp", "tp")):
        T = N * tokens if name == "tp" and same_global_batch else tokens
        # EP: each rank its own tokens; TP: the same tokens on every rank of the group, as TP requires
        seed = rank if name == "ep" else 0
        x = torch.randn(T, cfg.hidden_dim, generator=torch.Generator().manual_seed(seed)).to(device, cfg.torch_dtype)
        routing = balanced_routing(T, cfg, device)
        layer = MoELayer(cfg, dispatcher, experts, group=group).to(device)
        with torch.no_grad():  # one forward with the balanced routing, to count bytes
            rows_MH, counts_L, state = layer.dispatch(x, routing)
            layer.combine(layer.run_experts(rows_MH, counts_L, state), state)
        phases = layer.dispatcher.traffic.phases
        moving = ("dispatch", "combine") if name == "ep" else ("all_reduce",)
        counted = sum(phases[p].sent for p in moving if p in phases)
        model = (ep_bytes_per_rank(T, cfg.hidden_dim, cfg.top_k, N, b) if name == "ep"
                 else tp_bytes_per_rank(T, cfg.hidden_dim, N, b))
        w2 = layer.experts.w2  # [L, F, H]: F is this rank's part of an expert's inner size
        out[name] = {
            "tokens_per_rank": T, "counted_bytes": counted, "model_bytes": model,
            "other_bytes": sum(p.sent for k, p in phases.items() if k not in ("dispatch", "combine", "all_reduce")),
            "local_experts": w2.shape[0], "gemm_rows_per_expert": counts_L.tolist(),
            # one matrix of the first GEMM (w1, or each half of w13): [H, F] under EP, [H, F/N] under TP
            "gemm_weight_shape": [w2.shape[2], w2.shape[1]],
            "step_ms": median(train_step_times(layer, T, steps=steps, warmup=warmup, group=group, x=x)),
        }
        if rank == 0:  # the launcher streams this into the notebook while the cell runs
            print(f"{name.upper()} on {N} ranks, {T} tokens per rank: counted {counted:.0f} B, "
                  f"step {out[name]['step_ms']:.2f} ms", flush=True)
    return out


def main(argv=None) -> None:
    import argparse
    import json
    from pathlib import Path

    from .records import record_header
    from .torchrun import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = init_from_torchrun("lessons_lib.lab.ep_vs_tp")
    cuda = device.type == "cuda"
    runs = []
    dtype = "bfloat16" if cuda else "float32"
    for tokens, top_k in ((4096, 2), (4096, 8)):
        cfg = MoEConfig(num_experts=32, top_k=top_k, hidden_dim=2048, ffn_dim=1024, activation="swiglu", dtype=dtype)
        runs.append(measure_ep_vs_tp(cfg, tokens, experts="grouped", device=device))
        if dist.get_rank() == 0:
            print(json.dumps(runs[-1]), flush=True)
    if dist.get_rank() == 0:
        record = {**record_header("lessons_lib.lab.ep_vs_tp", device, argv), "runs": runs}
        Path(args.out).write_text(json.dumps(record, indent=1))
    leave_torchrun()


if __name__ == "__main__":
    main()
