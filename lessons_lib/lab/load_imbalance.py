"""The busiest rank sets the pace: training-step time against how unevenly the load falls (lesson 06).

Under expert parallelism a rank holds a fixed block of experts; steer more of every rank's tokens to one rank's
experts and the step time follows that rank's load, since every other rank waits for it at the next collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import experts_of_rank, rank_and_size
from ..moe.layer import MoELayer
from .timing import median, train_step_times


def step_time_against_load(cfg: MoEConfig, tokens: int, hot_shares: list[float], dispatcher: str = "alltoall",
                           experts: str = "loop", steps: int = 10, warmup: int = 3, group=None,
                           device=None) -> list[dict]:
    """Under expert parallelism, the training-step time as one rank's experts get more of the load.

    For each share h in hot_shares, a fraction of every rank's tokens is steered to rank 0's experts
    (the rest route freely), so that about h of all (token, slot) pairs land on rank 0. Returns one
    row per share: the measured rows each rank received, and the median step time (forward, backward,
    AdamW) of the slowest rank. Every rank of `group` must call it together; rank 0 prints a line per share
    as it goes (the launcher streams it into the notebook).
    """
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    hot = list(experts_of_rank(cfg.num_experts, 0, N))
    if cfg.top_k > len(hot):
        raise ValueError(f"a steered token sends its top_k={cfg.top_k} pairs to rank 0's {len(hot)} experts: "
                         f"needs top_k <= num_experts / ranks")
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(1000 + rank))
    out = []
    for i, h in enumerate(hot_shares):
        if not 1 / N <= h <= 1:
            raise ValueError(f"a hot share must be between 1/N = {1 / N:.3f} (balanced) and 1, got {h}")
        layer = MoELayer(cfg, dispatcher, experts, group=group).to(device)
        with torch.no_grad():  # feature 0 is 1 on the steered tokens; it pulls them to rank 0's experts
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[hot, 0] = 30.0
        # free tokens send 1/N of their pairs to rank 0, steered ones all of them
        steered = tokens if N == 1 else round(tokens * (h - 1 / N) / (1 - 1 / N))
        xs = x.clone()
        xs[:, 0] = 0.0
        xs[:steered, 0] = 1.0
        xs = xs.to(device, cfg.torch_dtype)
        _, aux = layer(xs)
        load = aux.tokens_per_expert.clone()
        dist.all_reduce(load, group=group)
        per_rank = load.view(N, -1).sum(1).tolist()
        ms = median(train_step_times(layer, tokens, steps, warmup, group, x=xs))
        out.append({"hot_share": h, "rows_per_rank": per_rank, "busiest_over_mean": max(per_rank) * N / sum(per_rank),
                    "step_ms": ms})
        if rank == 0:
            print(f"share {i + 1} of {len(hot_shares)}: {h:.2f} of the rows on rank 0, step {ms:.1f} ms", flush=True)
    return out
