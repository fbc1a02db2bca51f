"""Tensor parallelism for the MoE MLP, for comparison with expert parallelism (lesson 07).

Every rank of the TP group holds EVERY expert, but only a slice of each: columns
f = rank·F/N … (rank+1)·F/N − 1 of w1 (of both halves of w13) and the matching rows of w2. All ranks run the
same tokens; each computes a partial output y_r = Σ_k w_k · (act(x·w1[:, f]) · w2[f, :]),
and one all-reduce of [T, H] sums them: y = Σ_r y_r (Megatron's column-then-row split, per expert).

Autograd needs two mirror-image operators around the split part:
- `_CopyToTP`: identity forward; backward all-reduces the gradient, because each rank only
  computed its slice's share of the gradient of the (replicated) input. It also wraps the routing
  weights, whose gradient dy·out_r is likewise partial on each rank.
- `_ReduceFromTP`: all-reduce forward; identity backward (every rank needs the whole dy).
The all-reduce is done as reduce_scatter + all_gather, which is what a ring all-reduce moves, so
the bytes counted here are the bytes a ring moves: 2·(N−1)·⌈T/N⌉·H elements per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import MoEConfig
from .dispatch_allgather import _all_gather, _reduce_scatter
from .dispatch_local import LocalDispatcher, LocalState, weighted_sum_by_token
from .distributed import rank_and_size
from .router import Routing
from .traffic import Traffic


def _all_reduce_counted(x: torch.Tensor, group, traffic: Traffic | None, phase: str) -> torch.Tensor:
    """Sum `x` [T, ...] over the group as reduce_scatter + all_gather, counting what is sent."""
    N = dist.get_world_size(group)
    if N == 1:
        return x
    T = x.shape[0]
    chunk = -(-T // N)  # ceil: pad T to N equal chunks
    padded = torch.cat([x, x.new_zeros(N * chunk - T, *x.shape[1:])]).contiguous()
    mine = padded.new_empty(chunk, *x.shape[1:])
    _reduce_scatter(mine, padded, group=group)
    out = padded.new_empty(N * chunk, *x.shape[1:])
    _all_gather(out, mine, group=group)
    if traffic is not None:  # reduce_scatter and all_gather each send N-1 chunks of this rank
        nbytes = 2 * (N - 1) * mine.numel() * mine.element_size()
        traffic.add(phase, nbytes, nbytes, nbytes * T // (N * chunk) if chunk else 0)  # padding is not useful
    return out[:T]


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_counted(grad.contiguous(), ctx.group, None, ""), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, traffic):
        return _all_reduce_counted(x, group, traffic, "all_reduce")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class TensorParallelDispatcher(nn.Module):
    """All experts on every rank, each split along F; the same tokens on every rank."""

    collective = True
    replicated_tokens = True  # every rank of the group runs the same tokens (EP: each its own)

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        if cfg.dispatch_dtype is not None:
            raise ValueError("dispatcher 'tp' sends no rows to the experts (every rank runs every token), so there "
                             "is no dispatch to send in FP8: leave dispatch_dtype=None, or use an EP dispatcher")
        self.cfg = cfg
        self.group = group
        self.rank, self.world_size = rank_and_size(group)
        if cfg.ffn_dim % self.world_size:
            raise ValueError(f"ffn_dim ({cfg.ffn_dim}) must be divisible by the tensor-parallel size "
                             f"({self.world_size}) so that every rank holds the same slice of each expert")
        f = cfg.ffn_dim // self.world_size
        self.experts = range(cfg.num_experts)
        self.ffn_slice = slice(self.rank * f, (self.rank + 1) * f)
        self.local = LocalDispatcher(cfg)
        self.traffic = Traffic()

    def extra_repr(self) -> str:
        s = self.ffn_slice
        return f"rank {self.rank} of {self.world_size}, columns {s.start}..{s.stop - 1} of every expert's F"

    def abort(self, code: int, message: str, device: torch.device) -> None:
        self._first_exchange(code, device)
        raise ValueError(message)

    def _first_exchange(self, code: int, device) -> int:
        # TP has no count exchange; 8 bytes tell every rank whether any rank's input was invalid.
        flag = torch.tensor([code], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.traffic.add("error flag", 8 * (self.world_size > 1), 8 * (self.world_size > 1), 0)
        return int(flag.item())

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside=None):
        if beside is not None:  # nothing of ours in flight to hide it behind (lesson 09)
            beside()
        self.traffic = Traffic()
        if self._first_exchange(0, x_TH.device):
            raise ValueError("a rank of the tensor-parallel group got invalid input; every rank stops")
        x_TH = _CopyToTP.apply(x_TH, self.group)
        weights_Tk = _CopyToTP.apply(routing.weights, self.group)
        routing = Routing(routing.expert_ids, weights_Tk, routing.probs, routing.logits)
        return self.local.dispatch(x_TH, routing)

    def combine(self, expert_out_RH: torch.Tensor, state: LocalState) -> torch.Tensor:
        partial_TH = weighted_sum_by_token(expert_out_RH, state.index, state.weights_Tk)
        return _ReduceFromTP.apply(partial_TH, self.group, self.traffic)
