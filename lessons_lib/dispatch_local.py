"""Dispatch and combine on one device (lesson 01).

A dispatcher moves tokens to the experts and the results back:

    dispatch(x, routing) -> (rows [M, H] grouped by local expert, counts [E_local], state)
    combine(expert_out [M, H], state) -> y [T, H]

where combine weights each row by its routing weight and sums a token's k rows.
Lessons 02 and 03 replace this class by ones that send rows to other ranks; the
router and the expert bank around them stay the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MoEConfig
from .router import Routing


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
        k = routing.expert_ids.shape[1]
        flat_ids = routing.expert_ids.flatten()  # row i is (token i // k, slot i % k)
        # Stable sort: rows of one expert stay in token order, so results are reproducible.
        order = torch.argsort(flat_ids, stable=True)
        token = order // k
        counts = torch.bincount(flat_ids, minlength=self.cfg.num_experts)
        state = LocalState(token=token, weight=routing.weights.flatten()[order], num_tokens=x.shape[0])
        return x[token], counts, state

    def combine(self, expert_out: torch.Tensor, state: LocalState) -> torch.Tensor:
        return weighted_sum_by_token(expert_out, state.token, state.weight, state.num_tokens)


def weighted_sum_by_token(rows: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int):
    """y[t] = Σ weight[i] · rows[i] over the rows i whose token[i] == t: the combine step."""
    # Accumulate in fp32 so a bf16 layer sums its k contributions without extra rounding.
    weighted = rows.float() * weight[:, None]
    y = rows.new_zeros(num_tokens, rows.shape[1], dtype=torch.float32)
    return y.index_add(0, token, weighted).to(rows.dtype)
