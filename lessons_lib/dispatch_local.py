"""Dispatch and combine on one device (lesson 01).

A dispatcher moves tokens to the experts and the results back:

    dispatch(x, routing) -> (rows [M, H] grouped by local expert, counts [E_local], state)
    combine(expert_out [M, H], state) -> y [T, H]

where combine weights each row by its routing weight and sums a token's k rows.
Lessons 02 and 03 replace this class by ones that send rows to other ranks; the
router and the expert bank around them stay the same. Every dispatcher starts from the
same rows, `rows_by_expert`, which is also where lesson 05 applies the experts' capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .capacity import expert_capacity, select_within_capacity
from .config import MoEConfig
from .router import Routing


@dataclass
class Rows:
    """The rows a rank sends to the experts, one per kept (token, slot) pair, grouped by expert.

    token, expert, weight: [R] source token, global expert id and routing weight of each row.
    counts: [E] rows per expert. real: [R] False for lesson 05's padding rows, which repeat
    token 0 with weight 0: they cost what a real row costs and add exactly nothing.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    real: torch.Tensor


def rows_by_expert(routing: Routing, cfg: MoEConfig) -> Rows:
    """Flatten the [T, k] routing into rows and group them by expert, token order inside a group.

    With cfg.capacity_factor (lesson 05), each expert keeps at most C of this rank's rows
    (`capacity.select_within_capacity`), padded to exactly C with cfg.pad_to_capacity.
    """
    T, k = routing.expert_ids.shape
    flat_ids, flat_w = routing.expert_ids.flatten(), routing.weights.flatten()  # row i is (token i // k, slot i % k)
    C = expert_capacity(cfg, T)
    if C is None:
        # Stable sort: rows of one expert stay in token order, so results are reproducible.
        pick = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=cfg.num_experts)
    else:
        pick, counts = select_within_capacity(flat_ids, flat_w, cfg.num_experts, C, cfg.drop_policy,
                                              cfg.pad_to_capacity)
    real = pick >= 0
    pick = pick.clamp(min=0)
    slot_expert = torch.repeat_interleave(torch.arange(cfg.num_experts, device=counts.device), counts)
    return Rows(token=torch.where(real, pick // k, 0), expert=slot_expert,
                weight=torch.where(real, flat_w[pick], 0.0), counts=counts, real=real)


@dataclass
class LocalState:
    token: torch.Tensor  # [T·k] source token of each grouped row
    weight: torch.Tensor  # [T·k] its routing weight (fp32)
    num_tokens: int


class LocalDispatcher(nn.Module):
    """All experts live here: dispatch is a permutation, combine a weighted scatter-add."""

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        if group is not None:
            raise ValueError(
                "dispatcher 'local' keeps every expert on one device and takes no process group; "
                "use an expert-parallel dispatcher ('allgather', 'alltoall') with group="
            )
        self.cfg = cfg
        self.experts = range(cfg.num_experts)

    def extra_repr(self) -> str:
        return f"all {self.cfg.num_experts} experts on this device"

    def dispatch(self, x: torch.Tensor, routing: Routing):
        rows = rows_by_expert(routing, self.cfg)
        state = LocalState(token=rows.token, weight=rows.weight, num_tokens=x.shape[0])
        return x[rows.token], rows.counts, state

    def combine(self, expert_out: torch.Tensor, state: LocalState) -> torch.Tensor:
        return weighted_sum_by_token(expert_out, state.token, state.weight, state.num_tokens)


def weighted_sum_by_token(rows: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int):
    """y[t] = Σ weight[i] · rows[i] over the rows i whose token[i] == t: the combine step."""
    # Accumulate in fp32 so a bf16 layer sums its k contributions without extra rounding.
    weighted = rows.float() * weight[:, None]
    y = rows.new_zeros(num_tokens, rows.shape[1], dtype=torch.float32)
    return y.index_add(0, token, weighted).to(rows.dtype)
