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

Shapes as in `dispatcher` (T tokens, k, E experts, L local experts, H, R rows sent, M rows received, N ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .capacity import expert_capacity
from .dispatch_local import Permute, RowIndex, inverse_permutation, rows_by_expert, rows_of_pairs, weighted_sum_by_token
from .dispatcher import DispatchState, ExpertParallelDispatcher
from .router import Routing, count_per_expert
from .traffic import Traffic
from .wire import dispatch_row_bytes, wire_for


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable.

    forward: rank i sends in_splits[j] rows to rank j and receives out_splits[j] rows from it.
    backward: the gradient of each received row goes back to where the row came from, which
    is the same exchange with the two split lists swapped.
    wire (lesson 12): the rows travel encoded (`wire.Fp8Wire`: FP8 values and their scales in one payload) and
    arrive decoded; their gradient travels back as it is (straight-through).
    """

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group=None, wire=None):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        if wire is not None:
            out = wire.empty_payload(sum(out_splits), x.device)
            dist.all_to_all_single(out, wire.encode(x), out_splits, in_splits, group=group)
            return wire.decode(out)
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None, None


class InFlight:
    """The work handle an exchange leaves between `StartAllToAll` and `FinishAllToAll` (lesson 09), with the
    tensors it reads and writes, which must stay alive until it is waited for."""

    def __init__(self, async_op: bool, wire=None):
        self.async_op, self.wire = async_op, wire  # wire: the forward's rows travel encoded (lesson 12)
        self.work, self.tensors = None, ()

    def start(self, out, x, out_splits, in_splits, group) -> None:
        self.tensors = (out, x)
        self.work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=self.async_op)

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.work, self.tensors = None, ()


class StartAllToAll(torch.autograd.Function):
    """The first half of `AllToAll`, for work in its shadow (lesson 09): forward starts the exchange and returns
    its output buffer, filled once `FinishAllToAll` has waited; backward waits for the gradient's exchange that
    `FinishAllToAll.backward` started. Whatever autograd records between the two halves runs while the rows
    travel, in forward and (mirrored, as autograd runs later nodes first) in backward."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, flight: InFlight):
        ctx.flight = flight
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        if flight.wire is None:
            flight.start(out, x.contiguous(), out_splits, in_splits, group)
        else:  # the payload travels; FinishAllToAll decodes it into out
            flight.start(flight.wire.empty_payload(sum(out_splits), x.device), flight.wire.encode(x), out_splits,
                         in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad is what FinishAllToAll.backward passed on, already on its way back
        grad_x = ctx.flight.tensors[0]
        ctx.flight.wait()
        return grad_x, None, None, None, None


class FinishAllToAll(torch.autograd.Function):
    """The second half: forward waits for the exchange; backward starts the gradient's way back."""

    @staticmethod
    def forward(ctx, out, out_splits: list[int], in_splits: list[int], group, flight: InFlight):
        ctx.splits, ctx.group, ctx.flight = (out_splits, in_splits), group, flight
        payload = flight.tensors[0] if flight.wire is not None else None
        flight.wait()
        if payload is not None:
            out.copy_(flight.wire.decode(payload))
        flight.wire = None  # the gradient travels as it is
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x = grad.new_empty(sum(in_splits), *grad.shape[1:])
        ctx.flight.start(grad_x, grad.contiguous(), in_splits, out_splits, ctx.group)
        return grad, None, None, None, None  # StartAllToAll.backward returns grad_x once it has arrived


def all_to_all_beside(x, out_splits: list[int], in_splits: list[int], group, beside, wire=None) -> torch.Tensor:
    """`AllToAll.apply(x, out_splits, in_splits, group, wire)`, running `beside()` while the rows travel (lesson
    08). beside.overlap False: the same steps, with an exchange that blocks, so nothing overlaps."""
    flight = InFlight(async_op=beside.overlap, wire=wire)
    out = StartAllToAll.apply(x, out_splits, in_splits, group, flight)
    beside()
    return FinishAllToAll.apply(out, out_splits, in_splits, group, flight)


@dataclass
class AllToAllState(DispatchState):  # its `sizes` are always known: read back with the split sizes
    index: RowIndex  # what each sent row is (grouped by expert, hence by destination)
    weights_Tk: torch.Tensor  # the routing weights
    regroup_M: torch.Tensor | None  # received order -> grouped by local expert (None: one rank, already grouped)
    ungroup_M: torch.Tensor | None  # its inverse: grouped by local expert -> the order the rows were received in
    in_splits: list  # [N] rows sent to each rank
    out_splits: list  # [N] rows received from each rank
    useful_sent: list | None  # of in_splits, the real rows (not lesson 05's padding); None: in a CUDA graph
    useful_received: list | None  # of out_splits, the real rows


def read_later(t: torch.Tensor, block: bool = False):
    """Start copying a few numbers to the host; returns a function that waits for them and gives them as a list.

    `t.tolist()` waits for everything queued before it, and then the GPU sits idle until the host has queued new
    work. Copied without blocking, with an event behind the copy, the work queued after it (the dispatch's row
    gather) keeps the GPU busy while the host waits (`lab.sizes_readback` measures the difference). `block`: read
    them now, with `tolist()`, as before."""
    if block or t.device.type != "cuda":
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))

    def wait() -> list:
        copied.synchronize()
        return host.tolist()
    return wait


def capturing() -> bool:
    """Whether this pass is being recorded into a CUDA graph (`cuda_graph`, lesson 05)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class AllToAllDispatcher(ExpertParallelDispatcher):
    """Send each (token, slot) row only to the rank that owns its expert.

    fixed_sizes (lesson 15's `static_decode`): with lesson 05's static shapes, take the split sizes from the
    capacity, as a CUDA graph's recording does: no count exchange, no host read. Nothing then tells the other
    ranks of a bad input, so only `StaticDecode`, which checks its input first, sets it, around its own passes.
    """

    fixed_sizes = False
    # False: read the split sizes with a blocking .tolist(), as before `read_later` (`lab.sizes_readback` compares)
    read_sizes_later = True

    def __init__(self, cfg, group=None):
        super().__init__(cfg, group)
        self.wire = wire_for(cfg)  # lesson 12: None, or the rows travel in FP8

    def _first_exchange(self, counts_E: torch.Tensor, code: int, real_N: torch.Tensor | None = None) -> torch.Tensor:
        # Row r of what this rank sends to rank r: how many rows go to each of r's experts, how many
        # of them are real (not lesson 05's padding), then `code`.
        N, L = self.world_size, self.num_local_experts
        per_rank_NL = counts_E.view(N, L)
        real_N = per_rank_NL.sum(1) if real_N is None else real_N
        send = torch.cat([per_rank_NL, real_N.view(N, 1), counts_E.new_full((N, 1), code)], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        nbytes = (N - 1) * (L + 2) * 8
        self.traffic.add("counts", nbytes, nbytes, 0)
        return recv  # [N, L + 2]: row s = what rank s will send me

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside=None):
        N, L = self.world_size, self.num_local_experts
        index = rows_by_expert(routing, self.cfg)  # grouped by expert, hence by destination rank
        read_sizes = None
        if capturing() or self.fixed_sizes:
            in_splits, out_splits, recv_counts_NL, bank_sizes = self._static_sizes(x_TH, index)
            useful_sent = useful_received = None
        else:
            self.traffic = Traffic()
            real_sent_N = count_per_expert(index.expert // L, N, mask=index.real)  # real rows per destination
            recv = self._first_exchange(index.counts, 0, real_sent_N)
            recv_counts_NL = recv[:, :L]
            # One host sync for the split sizes: all_to_all_single needs them as Python ints (so does a loop of GEMMs).
            read_sizes = read_later(torch.cat([index.counts.view(N, L).sum(1), recv_counts_NL.sum(1), recv[:, L + 1],
                                               real_sent_N, recv[:, L], recv_counts_NL.sum(0)]),
                                    block=not self.read_sizes_later)
        rows_RH = rows_of_pairs(x_TH, index)  # queued first, so the GPU gathers while the host waits for the sizes
        if read_sizes is not None:
            sizes = read_sizes()
            in_splits, out_splits, codes = sizes[:N], sizes[N:2 * N], sizes[2 * N:3 * N]
            self._stop_if_any_rank_failed(codes)
            useful_sent, useful_received, bank_sizes = sizes[3 * N:4 * N], sizes[4 * N:5 * N], sizes[5 * N:]

        received_MH = self._exchange(rows_RH, out_splits, in_splits, beside, self.wire)
        regroup_M = ungroup_M = None
        if N > 1:  # rows arrive as (source 0: expert 0, expert 1, …), (source 1: …), …; the bank wants them by expert
            local_expert_M = torch.repeat_interleave(torch.arange(L, device=x_TH.device).repeat(N),
                                                     recv_counts_NL.flatten(), output_size=sum(out_splits))
            regroup_M = torch.argsort(local_expert_M, stable=True)
            ungroup_M = inverse_permutation(regroup_M)
            received_MH = Permute.apply(received_MH, regroup_M, ungroup_M)

        state = AllToAllState(index, routing.weights, regroup_M, ungroup_M, in_splits, out_splits, useful_sent,
                              useful_received, sizes=bank_sizes)
        if useful_sent is not None:
            self._count("dispatch", dispatch_row_bytes(self.cfg, self.wire), in_splits, out_splits, useful_sent)
        return received_MH, recv_counts_NL.sum(0), state

    def _static_sizes(self, x_TH: torch.Tensor, index: RowIndex):
        """The split sizes without asking anyone, for a pass recorded into a CUDA graph (`cuda_graph`, lesson 05).

        A graph cannot wait for the GPU to tell it a size, and replays every shape it recorded. Lesson 05's padded
        capacity makes every size known in advance: each rank sends exactly C rows to every expert (with the same
        token count, hence the same C, on every rank, which the graph's capture checks). There is no input error to
        report either: a graph's input is the buffer it was captured with. The traffic record is the last eager
        pass's."""
        if not self.cfg.pad_to_capacity:
            raise RuntimeError("a CUDA graph needs fixed split sizes: build the layer with lesson 05's static shapes, "
                               "MoEConfig(capacity_factor=..., pad_to_capacity=True)")
        N, L = self.world_size, self.num_local_experts
        C = expert_capacity(self.cfg, x_TH.shape[0])
        splits = [L * C] * N
        return splits, list(splits), index.counts.new_full((N, L), C), [N * C] * L

    def combine(self, expert_out_MH: torch.Tensor, state: AllToAllState, beside=None) -> torch.Tensor:
        """beside: work run while the results travel back (lesson 09's two micro-batches: the other half's
        experts), as `dispatch` runs it while the rows travel out."""
        if state.ungroup_M is not None:  # back in the order received (a gather: several times faster than a scatter)
            expert_out_MH = Permute.apply(expert_out_MH, state.ungroup_M, state.regroup_M)
        # (x, out_splits, in_splits): what comes back is what this rank sent in dispatch, so the two lists swap
        back_RH = self._exchange(expert_out_MH, state.in_splits, state.out_splits, beside)
        if state.useful_received is not None:
            self._count("combine", expert_out_MH.shape[1] * expert_out_MH.element_size(), state.out_splits,
                        state.in_splits, state.useful_received)
        return weighted_sum_by_token(back_RH, state.index, state.weights_Tk)

    def _exchange(self, x, out_splits: list[int], in_splits: list[int], beside, wire=None) -> torch.Tensor:
        """The rows' all_to_all_single (differentiable), `beside` run while they travel. A rank alone in its group
        has nowhere to send them: they are already where they go, and cost no copy (unless lesson 12's FP8 wire
        is to round them on the way, as it would between ranks)."""
        if self.world_size == 1 and wire is None:
            if beside is not None:
                beside()
            return x
        if beside is None:
            return AllToAll.apply(x, out_splits, in_splits, self.group, wire)
        return all_to_all_beside(x, out_splits, in_splits, self.group, beside, wire)  # lesson 09

    def _count(self, phase: str, row_bytes: int, sent: list, received: list, useful: list) -> None:
        """Bytes of rows sent to and received from other ranks (a rank's rows to itself stay put)."""
        others = [r for r in range(self.world_size) if r != self.rank]
        self.traffic.add(phase, sum(sent[r] for r in others) * row_bytes,
                         sum(received[r] for r in others) * row_bytes, sum(useful[r] for r in others) * row_bytes)
