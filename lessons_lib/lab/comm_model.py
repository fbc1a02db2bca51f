"""How many bytes one MoE layer moves per rank, under expert vs tensor parallelism (lesson 07).

T tokens on a rank, hidden size H, top-k routing, N ranks in the parallel group, b bytes per element,
balanced routing. Exact formulas; the course's rounded versions set (N−1)/N ≈ 1.

EP: dispatch sends the T·k rows of the rank, of which a fraction (N−1)/N leaves it; combine sends
    as many back:                       2 · T·k·H·b · (N−1)/N
TP: one ring all-reduce of the [T, H] output of the group (every rank holds the same T tokens):
                                        2 · (N−1)/N · T·H·b
At a fixed world size W, TP = t leaves only W/t data-parallel groups, so each TP rank holds t times
the tokens of an EP rank: EP / TP = k / t. EP moves less exactly when top-k < parallel size.
"""
from __future__ import annotations


def ep_bytes_per_rank(tokens: int, hidden: int, top_k: int, group_size: int, bytes_per_element: int = 2) -> float:
    """Dispatch + combine bytes one EP rank sends for its `tokens` tokens (balanced routing)."""
    return 2 * tokens * top_k * hidden * bytes_per_element * (group_size - 1) / group_size


def tp_bytes_per_rank(tokens: int, hidden: int, group_size: int, bytes_per_element: int = 2) -> float:
    """Bytes one TP rank sends in the ring all-reduce of the group's [tokens, hidden] output."""
    return 2 * (group_size - 1) / group_size * tokens * hidden * bytes_per_element


def at_world_size(global_tokens: int, world_size: int, parallel_size: int, hidden: int, top_k: int,
                  bytes_per_element: int = 2) -> dict:
    """EP = t and TP = t on the same W GPUs and the same global batch, bytes per rank per layer.

    TP = t: data parallelism DP = W / t; each TP group, and so each of its ranks, holds
    global_tokens / DP tokens. EP = t: the rest of the model keeps DP = W, so each rank holds
    global_tokens / W tokens, and EP groups are formed across those data-parallel ranks.
    """
    if world_size % parallel_size:
        raise ValueError(f"parallel_size ({parallel_size}) must divide world_size ({world_size})")
    dp_tp = world_size // parallel_size
    tp_tokens, ep_tokens = global_tokens / dp_tp, global_tokens / world_size
    return {
        "tp": {"dp": dp_tp, "tokens_per_rank": tp_tokens,
               "bytes": tp_bytes_per_rank(tp_tokens, hidden, parallel_size, bytes_per_element)},
        "ep": {"dp": world_size, "tokens_per_rank": ep_tokens,
               "bytes": ep_bytes_per_rank(ep_tokens, hidden, top_k, parallel_size, bytes_per_element)},
    }


def ep_moves_less(top_k: int, parallel_size: int) -> bool:
    """The crossover rule at a fixed world size: EP / TP bytes = top_k / parallel_size."""
    return top_k < parallel_size
