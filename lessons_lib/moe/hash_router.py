"""Hash routing: each token's experts come from a fixed hash of its token id (lesson 06).

Hash layers (Roller et al., 2021; DeepSeek-V4 uses them in its first MoE layers) learn nothing about routing:
token id v goes to the k experts with the largest hash(seed, v, e) over e = 0 … E−1, so they are k distinct
experts, the same on every rank and at every step, each with weight 1/k. There is no router GEMM, no router
weight and no balancing loss, and the expert-parallel path after it is unchanged.

Over token ids the load is balanced by construction (every expert is equally likely for a random id). Over a
stream of real text it is not: token frequencies follow a Zipf law, and the experts of the most frequent ids
take their traffic whatever the other ids do (`lab.hash_balance` measures it).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .router import Routing

_MOD = 2 ** 31  # values stay below 2^31, so a product with a multiplier below 2^31 fits in int64
_MULTIPLIERS = (1103515245, 1664525, 22695477)


def expert_hash(token_ids: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """[T, E] int64 pseudo-random scores in [0, 2^31), a fixed function of (seed, token id, expert)."""
    e_E = torch.arange(num_experts, device=token_ids.device)
    v = (token_ids.long().view(-1, 1) % _MOD) * num_experts + e_E + seed * 7919
    for a in _MULTIPLIERS:  # a few rounds of multiply-add and xor-shift mix the bits of all three
        v = (v % _MOD * a + 12345) % _MOD
        v = v ^ (v >> 15)
    return v


class HashRouter(nn.Module):
    """token ids [T] -> Routing: the k experts of the largest `expert_hash`, weights 1/k, no probs or logits."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg

    def extra_repr(self) -> str:
        return f"E={self.cfg.num_experts}, top_k={self.cfg.top_k}, hash of the token id (seed {self.cfg.seed})"

    def forward(self, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("router='hash' routes by token id: call the layer as layer(x, token_ids=ids)")
        k = self.cfg.top_k
        expert_ids = expert_hash(token_ids.to(x_TH.device), self.cfg.num_experts, self.cfg.seed).topk(k).indices
        weights = torch.full(expert_ids.shape, 1.0 / k, device=x_TH.device)
        return Routing(expert_ids=expert_ids, weights=weights, probs=None, logits=None)
