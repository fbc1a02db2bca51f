"""Expert parallelism by all_to_all_single (lesson 03).

Lesson 02 sent every row to every rank. Here each row goes only where its expert lives:
  1. group the T·k (token, slot) rows by expert id (`rows_by_expert`, as in lesson 01); since
     rank r owns a contiguous block of experts, this also groups them by destination rank;
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

from .capacity import expert_capacity
from .dispatch_allgather import ExpertParallelDispatcher
from .traffic import Traffic
from .dispatch_local import Permute, Rows, inverse_permutation, rows_by_expert, weighted_sum_by_token
from .router import Routing, count_per_expert


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
    rows: Rows  # what each sent row is (grouped by expert, hence by destination)
    weights: torch.Tensor  # [T, k] the routing weights
    regroup: torch.Tensor  # received order -> grouped by local expert
    ungroup: torch.Tensor  # its inverse: grouped by local expert -> the order the rows were received in
    in_splits: list  # rows sent to each rank
    out_splits: list  # rows received from each rank
    useful_sent: list | None  # of in_splits, the real rows (not lesson 05's padding); None: in a CUDA graph, not counted
    useful_received: list | None  # of out_splits, the real rows
    sizes: list  # rows per local expert, on the host, so the expert bank needs no host sync of its own


def capturing() -> bool:
    """Whether this pass is being recorded into a CUDA graph (`cuda_graphs`, lesson 05)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Send each (token, slot) row only to the rank that owns its expert."""

    def _first_exchange(self, counts: torch.Tensor, code: int, real: torch.Tensor | None = None) -> torch.Tensor:
        # Row r of what this rank sends to rank r: how many rows go to each of r's experts, how many
        # of them are real (not lesson 05's padding), then `code`.
        N, E_local = self.world_size, self.num_local_experts
        per_rank = counts.view(N, E_local)
        real = per_rank.sum(1) if real is None else real
        send = torch.cat([per_rank, real.view(N, 1), counts.new_full((N, 1), code)], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        nbytes = (N - 1) * (E_local + 2) * 8
        self.traffic.add("counts", nbytes, nbytes, 0)
        return recv  # [N, E_local + 2]: row s = what rank s will send me

    def dispatch(self, x: torch.Tensor, routing: Routing):
        N, E_local = self.world_size, self.num_local_experts
        rows = rows_by_expert(routing, self.cfg)  # grouped by expert, hence by destination rank
        if capturing():
            in_splits, out_splits, recv_counts, bank_sizes = self._static_sizes(x, rows)
            useful_sent = useful_received = None
        else:
            self.traffic = Traffic()
            real_sent = count_per_expert(rows.expert // E_local, N, mask=rows.real)  # real rows per destination
            recv = self._first_exchange(rows.counts, 0, real_sent)
            recv_counts = recv[:, :E_local]
            # One host sync for the split sizes: all_to_all_single needs them as Python ints (so does a loop over experts).
            sizes = torch.cat([rows.counts.view(N, E_local).sum(1), recv_counts.sum(1), recv[:, E_local + 1],
                               real_sent, recv[:, E_local], recv_counts.sum(0)]).tolist()
            in_splits, out_splits, codes = sizes[:N], sizes[N:2 * N], sizes[2 * N:3 * N]
            self._stop_if_any_rank_failed(codes)
            useful_sent, useful_received, bank_sizes = sizes[3 * N:4 * N], sizes[4 * N:5 * N], sizes[5 * N:]

        received = AllToAll.apply(x[rows.token], out_splits, in_splits, self.group)
        # Rows arrive as (source 0: expert 0, expert 1, …), (source 1: …), …; the bank wants them by expert.
        local_expert = torch.repeat_interleave(torch.arange(E_local, device=x.device).repeat(N),
                                               recv_counts.flatten(), output_size=sum(out_splits))
        regroup = torch.argsort(local_expert, stable=True)
        ungroup = inverse_permutation(regroup)

        state = AllToAllState(rows, routing.weights, regroup, ungroup, in_splits, out_splits, useful_sent,
                              useful_received, bank_sizes)
        if useful_sent is not None:
            self._count("dispatch", x, in_splits, out_splits, useful_sent)
        return Permute.apply(received, regroup, ungroup), recv_counts.sum(0), state

    def _static_sizes(self, x: torch.Tensor, rows):
        """The split sizes without asking anyone, for a pass recorded into a CUDA graph (`cuda_graphs`, lesson 05).

        A graph cannot wait for the GPU to tell it a size, and replays every shape it recorded. Lesson 05's padded
        capacity makes every size known in advance: each rank sends exactly C rows to every expert (with the same
        token count, hence the same C, on every rank, which the graph's capture checks). There is no input error to
        report either: a graph's input is the buffer it was captured with. The traffic record is the last eager pass's."""
        if not self.cfg.pad_to_capacity:
            raise RuntimeError("a CUDA graph needs fixed split sizes: build the layer with lesson 05's static shapes, "
                               "MoEConfig(capacity_factor=..., pad_to_capacity=True)")
        N, E_local = self.world_size, self.num_local_experts
        C = expert_capacity(self.cfg, x.shape[0])
        splits = [E_local * C] * N
        return splits, list(splits), rows.counts.new_full((N, E_local), C), [N * C] * E_local

    def combine(self, expert_out: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        # Gathers, not scatters, both ways: on a GPU a gather is several times faster than index_copy.
        received_order = Permute.apply(expert_out, state.ungroup, state.regroup)
        # (x, out_splits, in_splits): what comes back is what this rank sent in dispatch, so the two lists swap
        back = AllToAll.apply(received_order, state.in_splits, state.out_splits, self.group)
        if state.useful_received is not None:
            self._count("combine", expert_out, state.out_splits, state.in_splits, state.useful_received)
        return weighted_sum_by_token(back, state.rows, state.weights)

    def _count(self, phase: str, rows: torch.Tensor, sent: list, received: list, useful: list) -> None:
        """Bytes of rows sent to and received from other ranks (a rank's rows to itself stay put)."""
        row_bytes = rows.shape[1] * rows.element_size()
        others = [r for r in range(self.world_size) if r != self.rank]
        self.traffic.add(phase, sum(sent[r] for r in others) * row_bytes,
                         sum(received[r] for r in others) * row_bytes, sum(useful[r] for r in others) * row_bytes)
