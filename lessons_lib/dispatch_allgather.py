"""Expert parallelism by padded all_gather (lesson 02).

Rank r of N owns experts r·E/N … (r+1)·E/N − 1. Every rank:
  1. flattens its tokens into T·k (token, slot) rows (`rows_by_expert`, as in lesson 01), each
     with metadata (global expert id, source rank, source token);
  2. pads its rows to the largest row count of any rank, so every rank sends the same shape;
  3. all-gathers everyone's rows and metadata, and keeps the rows whose expert it owns;
  4. runs its experts on them (grouped by local expert);
  5. sends the results back with reduce_scatter, the mirror image of all_gather: each rank
     writes its results into a zero buffer at the gathered positions, and the sum over ranks
     lands each row on its source rank, where the k results of a token are weighted and added.

Simple, and wasteful: every rank receives every row of every rank, padding included, and keeps
only about 1/N of them. `Traffic` counts that waste; lesson 03 removes it.

This module also holds what every expert-parallel dispatcher shares: `ExpertParallelDispatcher`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import MoEConfig
from .dispatch_local import Rows, rows_by_expert, weighted_sum_by_token
from .distributed import experts_of_rank, rank_and_size
from .router import Routing, count_per_expert
from .traffic import Traffic

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor; same arguments.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Why a rank's input was refused; the code travels with the first collective so all ranks stop.
INPUT_PROBLEMS = {1: "shape", 2: "dtype", 3: "device"}


class ExpertParallelDispatcher(nn.Module):
    """What the expert-parallel dispatchers share: the group, which experts this rank owns,
    the traffic record, and stopping all ranks together when one rank's input is bad."""

    collective = True

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        self.cfg = cfg
        self.group = group  # None: all ranks
        self.rank, self.world_size = rank_and_size(group)  # RuntimeError if not initialized
        self.experts = experts_of_rank(cfg.num_experts, self.rank, self.world_size)  # ValueError if E % N
        self.num_local_experts = len(self.experts)
        self.traffic = Traffic()

    def extra_repr(self) -> str:
        e = self.experts
        return f"rank {self.rank} of {self.world_size}, owns experts {e.start}..{e.stop - 1}"

    def _stop_if_any_rank_failed(self, codes: list[int]) -> None:
        bad = [(r, c) for r, c in enumerate(codes) if c]
        if bad:
            r, c = bad[0]
            raise ValueError(f"rank {r} of the expert-parallel group got invalid input "
                             f"({INPUT_PROBLEMS.get(c, c)}); every rank stops before sending any token")

    def abort(self, code: int, message: str, device: torch.device) -> None:
        """Called by MoELayer instead of `dispatch` when this rank's input is invalid: take part
        in the first collective with an error code, so the other ranks raise too, then raise."""
        self._first_exchange(torch.zeros(self.cfg.num_experts, dtype=torch.long, device=device), code)
        raise ValueError(message)

    def _first_exchange(self, counts: torch.Tensor, code: int):
        """The dispatcher's first collective; it carries `code` (0: input fine) to every rank."""
        raise NotImplementedError


class _AllGather(torch.autograd.Function):
    """[M, ...] per rank -> [N·M, ...] on every rank; backward: reduce_scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """[N·M, ...] per rank -> [M, ...]: rank r gets the sum over ranks of block r; backward: all_gather."""

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
class AllGatherState:
    keep: torch.Tensor  # positions, in the gathered buffer, of the rows this rank's experts ran
    kept_real: torch.Tensor  # of those, which are real rows (not lesson 05's padding)
    padded_rows: int  # M, the per-rank row count after padding
    rows: Rows  # what each row this rank sent is
    weights: torch.Tensor  # [T, k] the routing weights


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

    def _first_exchange(self, counts: torch.Tensor, code: int) -> list[list[int]]:
        # Every rank's row count (to find the padding size) and input-error code.
        mine = torch.stack([counts.sum(), torch.tensor(code, device=counts.device)])
        every = mine.new_empty(self.world_size * 2)
        _all_gather(every, mine, group=self.group)
        every = every.view(self.world_size, 2)
        nbytes = (self.world_size - 1) * mine.numel() * 8
        self.traffic.add("sizes", nbytes, nbytes, 0)
        return every.tolist()

    def dispatch(self, x: torch.Tensor, routing: Routing):
        self.traffic = Traffic()
        H, N = x.shape[1], self.world_size
        rows = rows_by_expert(routing, self.cfg)  # the same rows as lesson 01, one per (token, slot)
        R = len(rows.token)
        every = self._first_exchange(rows.counts, 0)
        self._stop_if_any_rank_failed([c for _, c in every])
        M = max(n for n, _ in every)  # every rank pads to the busiest rank's row count

        meta = torch.stack([rows.expert, torch.full_like(rows.token, self.rank), rows.token, rows.real.long()], dim=1)
        sent = torch.cat([x[rows.token], x.new_zeros(M - R, H)])
        meta = torch.cat([meta, meta.new_full((M - R, self.META), -1)])  # expert -1: padding

        gathered = _AllGather.apply(sent, self.group)  # [N·M, H], differentiable
        gathered_meta = meta.new_empty(N * M, self.META)
        _all_gather(gathered_meta, meta, group=self.group)

        expert = gathered_meta[:, 0]
        keep = rows_of_experts(expert, self.experts)
        counts = count_per_expert(expert[keep] - self.experts.start, self.num_local_experts)

        row_bytes = H * x.element_size()
        needed_elsewhere = int((rows.real & (rows.expert // self.num_local_experts != self.rank)).sum())
        self.traffic.add("dispatch", (N - 1) * M * row_bytes, (N - 1) * M * row_bytes, needed_elsewhere * row_bytes)
        meta_bytes = (N - 1) * M * self.META * 8
        self.traffic.add("metadata", meta_bytes, meta_bytes, 0)
        state = AllGatherState(keep, gathered_meta[keep, 3] == 1, M, rows, routing.weights)
        return gathered[keep], counts, state

    def combine(self, expert_out: torch.Tensor, state: AllGatherState) -> torch.Tensor:
        H = expert_out.shape[1]
        N, M, R = self.world_size, state.padded_rows, len(state.rows.pair)
        results = expert_out.new_zeros(N * M, H).index_copy(0, state.keep, expert_out)
        back = _ReduceScatter.apply(results, self.group)[:R]  # my rows' results, in the order I sent them
        row_bytes = H * expert_out.element_size()
        # Results this rank computed for other ranks' tokens: real rows it kept from other blocks.
        for_others = int((state.kept_real & (state.keep // M != self.rank)).sum())
        self.traffic.add("combine", (N - 1) * M * row_bytes, (N - 1) * M * row_bytes, for_others * row_bytes)
        return weighted_sum_by_token(back, state.rows, state.weights)
