"""Routing by token id: a fixed hash of the id, or a stored table indexed by it (lesson 06).

Hash layers (Roller et al., 2021, "Hash Layers For Large Sparse Models") learn nothing about routing: here token id
v goes to the k experts with the largest hash(seed, v, e) over e = 0 … E−1, so they are k distinct experts, the
same on every rank and at every step, each with weight 1/k (`HashRouter`, router="hash"). There is no router
GEMM, no router weight and no balancing loss, and the expert-parallel path after it is unchanged. Roller et al.
compare a random hash with a balanced one, in which the ids are assigned so that the experts' loads come out even.

DeepSeek-V4 uses the shape of the second in its first 3 MoE layers (its report, §2.1 and §4.2.1; its inference
code's `Gate`): the expert ids are looked up in a stored table `tid2eid [vocab, k]` by token id, while the gate's
scores, sqrt(softplus(x·Wᵀ)), are still computed and give the chosen experts' weights, normalized and scaled
(`TableRouter`, router="table"). Its default table is the random hash's choice; `balanced_table` builds one from
token counts, offline, as a balanced hash would be.

Over token ids the random hash is balanced by construction (every expert is equally likely for a random id). Over
a stream of text it is not: token frequencies follow a Zipf law, and the experts of the most frequent ids take
their traffic whatever the other ids do (`lab.hash_balance` measures it, and what a table built from counts does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .init import expert_hash, hashed_table, init_router_weight  # noqa: F401 (expert_hash: lesson 06 reads it here)
from .router import Routing


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


def balanced_table(counts_V: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """[V, k] int64: a table built from how often each token id occurred (counts [V]), so that the experts' loads
    come out as even as a fixed table can make them. Greedy, most frequent id first: each id takes the k least
    loaded experts so far (the lower id on a tie), which then carry its count. Every count gets one added (an id
    not seen in the sample may still come), so that unseen ids spread over the experts instead of all taking the
    same k."""
    V = counts_V.shape[0]
    if top_k > num_experts:
        raise ValueError(f"balanced_table: top_k ({top_k}) must be at most num_experts ({num_experts})")
    counts = counts_V.detach().cpu().double() + 1
    load = torch.zeros(num_experts, dtype=torch.float64)
    table = torch.empty(V, top_k, dtype=torch.long)
    order = torch.argsort(counts, descending=True, stable=True)
    for v in order.tolist():
        chosen = torch.argsort(load, stable=True)[:top_k]  # stable: the lower expert id on a tie
        table[v] = chosen
        load[chosen] += counts[v]
    return table


class TableRouter(nn.Module):
    """token ids [T] -> Routing: the experts `tid2eid[id]`; their weights the gate's sqrt(softplus(x·Wᵀ)) scores
    of those experts, normalized to sum 1 (cfg.norm_topk_prob), times cfg.routed_scaling_factor (DeepSeek-V4).

    `tid2eid` [vocab_size, k] is a buffer, not a parameter: no optimizer moves it; every rank holds the same (a
    layer loads it with its weights). `weight` [E, H] is learned as any router's. Nothing is chosen by score, so
    there is no balancing loss: `probs` and `logits` are None."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(init_router_weight(cfg))  # [E, H], the gate
        self.register_buffer("tid2eid", hashed_table(cfg))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"E={c.num_experts}, top_k={c.top_k}, table [{c.vocab_size}, {c.top_k}], scale={c.routed_scaling_factor}"

    def check_table(self, table: torch.Tensor) -> None:
        """A ValueError unless `table` [vocab_size, k] gives every id k different experts in 0..E-1."""
        c = self.cfg
        if table.shape != (c.vocab_size, c.top_k) or table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"router.tid2eid must be an integer table [{c.vocab_size}, {c.top_k}], "
                             f"got {list(table.shape)} {table.dtype}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= c.num_experts):
            raise ValueError(f"router.tid2eid holds expert ids outside 0..{c.num_experts - 1}")
        ordered = table.sort(dim=1).values
        if c.top_k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("router.tid2eid gives some token id the same expert twice: each row needs k different")

    def forward(self, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("router='table' routes by token id: call the layer as layer(x, token_ids=ids)")
        scores = F.softplus(F.linear(x_TH.float(), self.weight.float())).sqrt()
        expert_ids = self.tid2eid[token_ids.to(self.tid2eid.device)]
        weights = scores.gather(1, expert_ids)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing(expert_ids=expert_ids, weights=weights * self.cfg.routed_scaling_factor, probs=None,
                       logits=None)
