"""Expert parallelism by all_to_all_single (lesson 03).

Lesson 02 sent every row to every rank. Here each row goes only where its expert lives:
  1. sort the T·k (token, slot) rows by expert id (stable); since rank r owns a contiguous block
     of experts, this also groups them by destination rank;
  2. exchange counts: one all_to_all_single of the per-expert row counts tells every rank how
     many rows it will receive from each source, for each of its experts;
  3. all_to_all_single the rows, with input split sizes (rows to each rank) and output split
     sizes (rows from each rank): no padding, nothing received that is not needed;
  4. regroup the received rows, which arrive ordered by (source rank, expert), by expert;
  5. after the experts, do it all in reverse: un-regroup, all_to_all back with the split sizes
     swapped, and weight-and-sum each token's k rows.
The backward pass of an all-to-all is the same all-to-all with input and output splits swapped:
`AllToAll` below says exactly that, so autograd can flow through both collectives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch_allgather import ExpertParallelDispatcher
from .traffic import Traffic
from .dispatch_local import weighted_sum_by_token
from .router import Routing


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable.

    forward: rank i sends in_splits[j] rows to rank j and receives out_splits[j] rows from it.
    backward: the gradient of each received row goes back to where the row came from, which
    is the same exchange with the two split lists swapped.
    """

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group=None):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


@dataclass
class AllToAllState:
    token: torch.Tensor  # [T·k] source token of each sent row (sorted order)
    weight: torch.Tensor  # [T·k] its routing weight
    num_tokens: int
    regroup: torch.Tensor  # received order -> grouped by local expert
    in_splits: list  # rows sent to each rank
    out_splits: list  # rows received from each rank


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Send each (token, slot) row only to the rank that owns its expert."""

    def _first_exchange(self, counts: torch.Tensor, code: int) -> torch.Tensor:
        # Row i of what this rank sends to rank r: how many rows go to each of r's experts, then `code`.
        N, E_local = self.world_size, self.num_local_experts
        send = torch.cat([counts.view(N, E_local), counts.new_full((N, 1), code)], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        nbytes = (N - 1) * (E_local + 1) * 8
        self.traffic.add("counts", nbytes, nbytes, 0)
        return recv  # [N, E_local + 1]: row s = what rank s will send me, per local expert

    def dispatch(self, x: torch.Tensor, routing: Routing):
        self.traffic = Traffic()
        k = routing.expert_ids.shape[1]
        N, E_local, E = self.world_size, self.num_local_experts, self.cfg.num_experts
        flat_ids = routing.expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)  # by expert, hence by destination rank
        token = order // k
        counts = torch.bincount(flat_ids, minlength=E)

        recv = self._first_exchange(counts, 0)
        recv_counts = recv[:, :E_local]
        # One host sync for the split sizes: all_to_all_single needs them as Python ints.
        sizes = torch.cat([counts.view(N, E_local).sum(1), recv_counts.sum(1), recv[:, E_local]]).tolist()
        in_splits, out_splits, codes = sizes[:N], sizes[N:2 * N], sizes[2 * N:]
        self._stop_if_any_rank_failed(codes)

        rows = AllToAll.apply(x[token], out_splits, in_splits, self.group)
        # Rows arrive as (source 0: expert 0, expert 1, …), (source 1: …), …; the bank wants them by expert.
        local_expert = torch.repeat_interleave(
            torch.arange(E_local, device=x.device).repeat(N), recv_counts.flatten())
        regroup = torch.argsort(local_expert, stable=True)

        row_bytes = x.shape[1] * x.element_size()
        sent = sum(n for r, n in enumerate(in_splits) if r != self.rank) * row_bytes
        received = sum(n for r, n in enumerate(out_splits) if r != self.rank) * row_bytes
        self.traffic.add("dispatch", sent, received, sent)
        state = AllToAllState(token, routing.weights.flatten()[order], x.shape[0], regroup, in_splits, out_splits)
        return rows[regroup], recv_counts.sum(0), state

    def combine(self, expert_out: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        received_order = torch.empty_like(expert_out).index_copy(0, state.regroup, expert_out)
        back = AllToAll.apply(received_order, state.in_splits, state.out_splits, self.group)
        row_bytes = expert_out.shape[1] * expert_out.element_size()
        sent = sum(n for r, n in enumerate(state.out_splits) if r != self.rank) * row_bytes
        received = sum(n for r, n in enumerate(state.in_splits) if r != self.rank) * row_bytes
        self.traffic.add("combine", sent, received, sent)
        return weighted_sum_by_token(back, state.token, state.weight, state.num_tokens)
