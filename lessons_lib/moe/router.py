"""The router: which experts each token goes to, and with what weight (lesson 01).

Lesson 06 adds DeepSeek-V3's router beside `TopKRouter` (`load_balancing.SigmoidBiasRouter`); every
router returns a `Routing`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .init import init_router_weight


@dataclass
class Routing:
    """What the router decided for T tokens.

    expert_ids: [T, k] int64, the chosen experts of each token, best first.
    weights: [T, k] fp32, the weight of each chosen expert in the token's output.
    probs: [T, E] fp32, the router's full probability distribution (for the losses); None for a router that
        scores nothing (lesson 06's hash router).
    logits: [T, E] fp32, the raw scores (None likewise).
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None
    logits: torch.Tensor | None

    def tokens_per_expert(self, num_experts: int) -> torch.Tensor:
        """How many (token, slot) pairs each expert received: [E] int64, sums to T·k."""
        return count_per_expert(self.expert_ids.flatten(), num_experts)


def top_k(probs: torch.Tensor, k: int, normalize: bool):
    """(weights [T, k], expert ids [T, k]), best first; with `normalize` the k weights sum to 1."""
    weights, expert_ids = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def count_per_expert(ids: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[E] int64: how many entries of `ids` are each expert (only those where `mask` is True, if given).

    `torch.bincount` would do, but on a GPU it copies the largest id back to the CPU to size its
    output: a host synchronisation, which stalls the GPU. A scatter-add into E zeros needs none.
    """
    ones = torch.ones_like(ids) if mask is None else mask.long()
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, ones)


class TopKRouter(nn.Module):
    """Softmax over all experts, then top-k (Mixtral).

    With `norm_topk_prob` the k chosen probabilities are renormalized to sum to 1
    (Mixtral); without it they are used as they are (Qwen-MoE with norm_topk_prob=False),
    so a token's weights sum to less than 1.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(init_router_weight(cfg))  # [E, H], the name every variant loads

    def extra_repr(self) -> str:
        c = self.cfg
        return f"E={c.num_experts}, top_k={c.top_k}, norm_topk_prob={c.norm_topk_prob}"

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        """token_ids: unused; every router takes them, the hash router (lesson 06) needs them."""
        # Scores in fp32: a bf16 softmax over many experts flips near-ties in top-k.
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, expert_ids = top_k(probs, self.cfg.top_k, self.cfg.norm_topk_prob)
        return Routing(expert_ids=expert_ids, weights=weights, probs=probs, logits=logits)


def load_balancing_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss, E · Σ_i f_i · P_i, counted over all T·k assignments.

    f_i: the fraction of the T·k (token, slot) assignments that went to expert i
         (a count: no gradient flows through it). Counting all k choices, normalised by T·k, is how
         Megatron-core counts; Switch has k = 1, and GShard (and DeepSpeed) count first choices only.
    P_i: the mean router probability of expert i over the T tokens (differentiable).

    Normalization: f and P each sum to 1, so the loss is exactly 1 when routing is
    uniform (f_i = P_i = 1/E) and grows towards E as routing collapses onto one expert,
    whatever k is. (Switch uses k = 1; HF's Mixtral version is k times this value.)
    Its gradient pushes probability away from the experts that get the most tokens.
    """
    if routing.probs is None:  # a router with nothing to learn (lesson 06's hash router): no loss
        return routing.weights.new_zeros(())
    T = routing.probs.shape[0]
    if T == 0:
        return routing.probs.sum() * 0.0  # keeps the graph, so backward still works
    f = routing.tokens_per_expert(num_experts).to(routing.probs.dtype) / routing.expert_ids.numel()
    P = routing.probs.mean(dim=0)
    return num_experts * (f * P).sum()
