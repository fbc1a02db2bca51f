"""Load balancing: DeepSeek-V3's router, the router z-loss, and aux-loss-free balancing (lesson 06).

Under expert parallelism a rank holds a fixed block of experts, so a rank whose experts are
popular does more work while the others wait: the busiest rank sets the step time. Three tools
keep the load even:

- the Switch-style auxiliary loss (`router.load_balancing_loss`, lesson 01), a gradient that
  pushes probability away from overloaded experts;
- the router z-loss, mean over tokens of logsumexp(logits)², which keeps the logits small
  (ST-MoE adds it for stability, not balance);
- DeepSeek-V3's bias: the router chooses experts on score + b_i, but weights them by the score
  alone; b is not learned by gradients but nudged after each step towards the underloaded
  experts (`update_expert_bias`). Balance without a loss term that fights the task loss.

`SigmoidBiasRouter` is DeepSeek-V3's router, with its group-limited selection: experts form
G groups, and a token may only pick experts in its best few groups (a group's score is the sum
of its two best scores s + b, so the bias steers groups too), which under EP bounds how many ranks
(or nodes) a token is sent to.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .init import init_router_weight
from .router import Routing


def allowed_by_group(scores: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """[T, E] bool: the experts in each token's `topk_groups` best groups of `num_groups`.

    A group's score is the sum of its 2 best scores (its best one if it has a single expert); the router
    passes s + b, so the balancing bias also decides which groups win.
    """
    T, E = scores.shape
    per_group = scores.view(T, num_groups, E // num_groups)
    group_score = per_group.topk(min(2, E // num_groups), dim=-1).values.sum(-1)  # [T, G]
    best = group_score.topk(topk_groups, dim=-1).indices
    keep = torch.zeros(T, num_groups, dtype=torch.bool, device=scores.device).scatter(1, best, True)
    return keep.repeat_interleave(E // num_groups, dim=1)


class SigmoidBiasRouter(nn.Module):
    """DeepSeek-V3 routing: s = sigmoid(logits); choose top-k of s + b (in the allowed groups);
    weights = the chosen s, normalized to sum 1 (cfg.norm_topk_prob), times routed_scaling_factor.

    `expert_bias` (b) is a buffer, not a parameter: no optimizer touches it; `update_expert_bias`
    moves it. `Routing.probs` holds s normalized over the experts, for the auxiliary loss.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(init_router_weight(cfg))  # [E, H], as TopKRouter's
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def extra_repr(self) -> str:
        c = self.cfg
        groups = f", groups {c.topk_groups} of {c.num_groups}" if c.topk_groups else ""
        return f"E={c.num_experts}, top_k={c.top_k}, sigmoid + bias{groups}, scale={c.routed_scaling_factor}"

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores.detach() + self.expert_bias  # the bias only decides who is chosen
        if c.topk_groups is not None:
            choice = choice.masked_fill(~allowed_by_group(choice, c.num_groups, c.topk_groups), float("-inf"))
        expert_ids = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)  # from s, not s + b
        if c.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * c.routed_scaling_factor
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return Routing(expert_ids=expert_ids, weights=weights, probs=probs, logits=logits)


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)². Penalizes large logits,
    which make the softmax (and bf16 rounding of it) brittle; it does not balance anything."""
    if routing.logits is None:  # no scores (lesson 06's hash router): nothing to keep small
        return routing.weights.new_zeros(())
    if routing.logits.shape[0] == 0:
        return routing.logits.sum() * 0.0
    return torch.logsumexp(routing.logits, dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(router: SigmoidBiasRouter, tokens_per_expert: torch.Tensor, rate: float, group=None):
    """DeepSeek-V3's aux-loss-free step, after the optimizer step: b_i += rate · sign(mean load − load_i).

    tokens_per_expert: [E] this rank's loads. They are summed over `group` first (when the process
    group is initialized), so every rank sees the global load and keeps the same bias.
    """
    if rate < 0:
        raise ValueError(f"the bias update rate must be >= 0, got {rate}")
    load = tokens_per_expert.detach().to(router.expert_bias.device, torch.float32).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load, group=group)
    router.expert_bias.copy_(bias_step(router.expert_bias, load, rate))
    return load


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """b + rate · sign(mean load − load): up for underloaded experts, down for overloaded, still when equal."""
    return bias + rate * torch.sign(load.mean() - load)
