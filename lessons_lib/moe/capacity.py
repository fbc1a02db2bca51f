"""Expert capacity: a per-expert budget of rows, token dropping, and static shapes (lesson 05).

Without a budget, the rows an expert receives depend on the routing: every shape downstream
(all-to-all split sizes, expert GEMMs) changes from step to step, and one popular expert can
receive every token. With capacity factor c, each expert accepts at most

    C = ceil(k · T / E · c)

(token, slot) pairs from the T tokens of one rank (k·T/E is its share under perfect balance).
The pairs past C are dropped: they add nothing to their token's output, which keeps its other
experts and, in a transformer, the residual path. Which pairs go is the drop policy:
"probs" keeps an expert's highest-weight pairs, "position" its first pairs in token order.
"probs" ranks the final routing weights, after top-k normalization: with top_k = 1 and normalized
weights every weight is 1, and it keeps what "position" keeps.

Padding every expert's rows to exactly C fixes every shape: the price is computing and sending
the empty slots. The drop decisions are made where the tokens are, before any communication,
so an expert-parallel layer drops exactly what the single-device layer drops on the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import torch

from .config import MoEConfig
from .router import count_per_expert


def expert_capacity(cfg: MoEConfig, num_tokens: int) -> int | None:
    """C = ceil(k·T/E · capacity_factor), or None when the layer is dropless."""
    if cfg.capacity_factor is None:
        return None
    # Exact arithmetic: in floats 50 · 1.1 is 55.00000000000001, and ceil would give 56 slots, not 55.
    share = Fraction(cfg.top_k * num_tokens, cfg.num_experts) * Fraction(str(cfg.capacity_factor))
    return math.ceil(share)


def select_within_capacity(expert: torch.Tensor, weight: torch.Tensor, num_experts: int, capacity: int,
                           policy: str = "probs", pad: bool = False):
    """Which rows each expert keeps. expert, weight: [R], one entry per (token, slot) row, in token order.

    Returns (pick, counts): pick indexes the kept rows, grouped by expert; counts [E] is each
    expert's number of rows. With pad, every expert gets exactly `capacity` rows (counts all C)
    and the empty slots are -1 in pick.
    """
    if policy == "probs":  # highest weight first; ties keep token order
        by_weight = torch.argsort(weight, descending=True, stable=True)
        order = by_weight[torch.argsort(expert[by_weight], stable=True)]
    elif policy == "position":
        order = torch.argsort(expert, stable=True)
    else:
        raise ValueError(f"drop policy must be 'probs' or 'position', got {policy!r}")
    counts = count_per_expert(expert, num_experts)
    first_row = torch.cumsum(counts, 0) - counts  # where each expert's group starts in `order`
    place = torch.arange(len(order), device=expert.device) - first_row[expert[order]]  # 0, 1, … within the group
    fits = place < capacity
    if not pad:
        return order[fits], counts.clamp(max=capacity)  # how many rows fit decides the shape
    # Padded, the shape is fixed: each row goes to its slot expert·C + place, or, if it does not fit, to one
    # spare slot cut off after. No boolean-mask indexing, so on a GPU no wait for the data-dependent size.
    slot = torch.where(fits, expert[order] * capacity + place, num_experts * capacity)
    pick = torch.full((num_experts * capacity + 1,), -1, dtype=torch.long, device=expert.device)
    return pick.scatter_(0, slot, order)[:-1], torch.full_like(counts, capacity)


def dropped_pairs(tokens_per_expert: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """How many (token, slot) pairs go over capacity: Σ_e max(0, n_e − C), whatever the policy."""
    if capacity is None:
        return tokens_per_expert.new_zeros(())
    return (tokens_per_expert - capacity).clamp(min=0).sum()


def padding_rows(tokens_per_expert: torch.Tensor, capacity: int) -> torch.Tensor:
    """Empty slots when every expert is padded to C: Σ_e (C − min(n_e, C))."""
    return (capacity - tokens_per_expert.clamp(max=capacity)).sum()


def static_dropless(cfg: MoEConfig) -> MoEConfig:
    """`cfg` with static shapes that drop nothing: every expert padded to C = T rows per rank."""
    return replace(cfg, capacity_factor=cfg.num_experts / cfg.top_k, pad_to_capacity=True)


def padding_fraction(cfg: MoEConfig, tokens: int) -> float:
    """Of the rows a static layer sends and computes, the fraction that are empty slots: 1 − k·T / (E·C)."""
    C = expert_capacity(cfg, tokens)
    return 1 - cfg.top_k * tokens / (cfg.num_experts * C)
