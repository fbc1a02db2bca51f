"""Expert parallelism by padded all_gather (lesson 02).

Rank r of N owns experts r·E/N … (r+1)·E/N − 1. Every rank:
  1. flattens its tokens into T·k (token, slot) rows (`rows_by_expert`, as in lesson 01), each
     with metadata (global expert id, source rank, source token);
  2. pads its rows to the largest row count P of any rank, so every rank sends the same shape;
  3. all-gathers everyone's rows and metadata, and keeps the rows whose expert it owns;
  4. runs its experts on them (grouped by local expert);
  5. sends the results back with reduce_scatter, the mirror image of all_gather: each rank
     writes its results into a zero buffer at the gathered positions, and the sum over ranks
     lands each row on its source rank, where the k results of a token are weighted and added.

Simple, and wasteful: every rank receives every row of every rank, padding included, and keeps
only about 1/N of them. `Traffic` counts that waste; lesson 03 removes it.

Shapes as in `dispatcher` (T tokens, k, E experts, L local experts, H, R rows sent, M rows kept, N ranks),
and P: the rows every rank sends after padding, the largest R of any rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch_local import RowIndex, rows_by_expert, weighted_sum_by_token
from .dispatcher import DispatchState, ExpertParallelDispatcher
from .router import Routing, count_per_expert
from .traffic import Traffic
from .wire import dispatch_row_bytes, wire_for

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor; same arguments.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """[P, ...] per rank -> [N·P, ...] on every rank; backward: reduce_scatter of the gradient.
    wire (lesson 12): the rows travel encoded and arrive decoded; the gradient travels as it is."""

    @staticmethod
    def forward(ctx, x, group, wire=None):
        ctx.group = group
        rows = dist.get_world_size(group) * x.shape[0]
        if wire is not None:
            out = wire.empty_payload(rows, x.device)
            _all_gather(out, wire.encode(x), group=group)
            return wire.decode(out)
        out = x.new_empty(rows, *x.shape[1:])
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    """[N·P, ...] per rank -> [P, ...]: rank r gets the sum over ranks of block r; backward: all_gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
        _reduce_scatter(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group), None


@dataclass
class AllGatherState(DispatchState):
    keep_M: torch.Tensor  # positions, in the gathered buffer, of the rows this rank's experts ran
    kept_real_M: torch.Tensor  # of those, which are real rows (not lesson 05's padding)
    padded_rows: int  # P, the per-rank row count after padding: the gathered buffer is [N·P, H]
    index: RowIndex  # what each row this rank sent is
    weights_Tk: torch.Tensor  # the routing weights


def rows_of_experts(expert: torch.Tensor, experts: range) -> torch.Tensor:
    """Positions of the rows whose expert is in `experts` (padding rows have expert -1), bucketed by
    expert with a stable sort, so gather order is kept inside a bucket."""
    keep = torch.nonzero((expert >= experts.start) & (expert < experts.stop)).squeeze(1)
    return keep[torch.argsort(expert[keep], stable=True)]


class AllGatherDispatcher(ExpertParallelDispatcher):
    """Gather every rank's padded rows, keep this rank's; return results by reduce_scatter."""

    # int64 columns of metadata per row: expert id; source rank and source token (where the row came from, for the
    # reader and for debugging: results go back by position, through reduce_scatter); real (1) or lesson 05's
    # capacity padding (0). The all_gather's own padding rows are -1 in every column.
    META = 4

    def __init__(self, cfg, group=None):
        super().__init__(cfg, group)
        self.wire = wire_for(cfg)  # lesson 12: None, or the rows travel in FP8

    def _first_exchange(self, counts_E: torch.Tensor, code: int) -> list[list[int]]:
        # Every rank's row count (to find the padding size) and input-error code.
        mine = torch.stack([counts_E.sum(), torch.tensor(code, device=counts_E.device)])
        every = mine.new_empty(self.world_size * 2)
        _all_gather(every, mine, group=self.group)
        every = every.view(self.world_size, 2)
        nbytes = (self.world_size - 1) * mine.numel() * 8
        self.traffic.add("sizes", nbytes, nbytes, 0)
        return every.tolist()

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside=None):
        if beside is not None:  # nothing of ours in flight to hide it behind (lesson 09)
            beside()
        self.traffic = Traffic()
        H, N = x_TH.shape[1], self.world_size
        index = rows_by_expert(routing, self.cfg)  # the same rows as lesson 01, one per (token, slot)
        R = len(index.token)
        every = self._first_exchange(index.counts, 0)
        self._stop_if_any_rank_failed([c for _, c in every])
        P = max(n for n, _ in every)  # every rank pads to the busiest rank's row count

        meta = torch.stack([index.expert, torch.full_like(index.token, self.rank), index.token,
                               index.real.long()], dim=1)
        sent_PH = torch.cat([x_TH[index.token], x_TH.new_zeros(P - R, H)])
        padded_meta = torch.cat([meta, meta.new_full((P - R, self.META), -1)])  # expert -1: padding

        gathered_NPH = _AllGather.apply(sent_PH, self.group, self.wire)  # [N·P, H], differentiable
        gathered_meta = padded_meta.new_empty(N * P, self.META)
        _all_gather(gathered_meta, padded_meta, group=self.group)

        expert = gathered_meta[:, 0]
        keep_M = rows_of_experts(expert, self.experts)
        counts_L = count_per_expert(expert[keep_M] - self.experts.start, self.num_local_experts)

        row_bytes = dispatch_row_bytes(self.cfg, self.wire)
        needed_elsewhere = int((index.real & (index.expert // self.num_local_experts != self.rank)).sum())
        self.traffic.add("dispatch", (N - 1) * P * row_bytes, (N - 1) * P * row_bytes, needed_elsewhere * row_bytes)
        meta_bytes = (N - 1) * P * self.META * 8
        self.traffic.add("metadata", meta_bytes, meta_bytes, 0)
        state = AllGatherState(keep_M, gathered_meta[keep_M, 3] == 1, P, index, routing.weights)
        return gathered_NPH[keep_M], counts_L, state

    def combine(self, expert_out_MH: torch.Tensor, state: AllGatherState) -> torch.Tensor:
        H = expert_out_MH.shape[1]
        N, P, R = self.world_size, state.padded_rows, len(state.index.pair)
        results_NPH = expert_out_MH.new_zeros(N * P, H).index_copy(0, state.keep_M, expert_out_MH)
        back_RH = _ReduceScatter.apply(results_NPH, self.group)[:R]  # my rows' results, in the order I sent them
        row_bytes = H * expert_out_MH.element_size()
        # Results this rank computed for other ranks' tokens: real rows it kept from other blocks.
        for_others = int((state.kept_real_M & (state.keep_M // P != self.rank)).sum())
        self.traffic.add("combine", (N - 1) * P * row_bytes, (N - 1) * P * row_bytes, for_others * row_bytes)
        return weighted_sum_by_token(back_RH, state.index, state.weights_Tk)
