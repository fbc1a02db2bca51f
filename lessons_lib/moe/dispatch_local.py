"""Dispatch and combine on one device (lesson 01).

A dispatcher (the contract: `dispatcher.Dispatcher`, with the shape legend T, k, E, L, H, R, M, N) moves
tokens to the experts and the results back; combine weights each row by its routing weight and sums a token's
k rows. Lessons 02 and 03 replace this class by ones that send rows to other ranks; the router and the expert
bank around them stay the same. Every dispatcher starts from the same rows, `rows_by_expert`, which is also
where lesson 05 applies the experts' capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .capacity import expert_capacity, select_within_capacity
from .config import MoEConfig
from .dispatcher import DispatchState
from .fp8 import FakeQuantFP8
from .fused import CombineRows, ExpandRows
from .router import Routing, count_per_expert
from .traffic import Traffic


@dataclass
class RowIndex:
    """What each row a rank sends to the experts is: one row per kept (token, slot) pair, grouped by expert.

    pair: [R] which (token, slot) pair each row is, as an index into the flattened [T, k] routing
        (token = pair // k), or -1 for lesson 05's padding rows, which repeat token 0: they cost
        what a real row costs and are left out of the combine.
    token, expert: [R] the source token and the global expert id of each row.
    counts: [E] rows per expert (lesson 05's padding included).
    every_pair: True when the rows are exactly the T·k pairs, no pair dropped and no padding.
    row_of_pair: [T, k] then, the row each (token, slot) pair became (`pair`'s inverse permutation); else None.
    """

    pair: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    counts: torch.Tensor
    every_pair: bool
    row_of_pair: torch.Tensor | None = None

    @property
    def real(self) -> torch.Tensor:
        return self.pair >= 0


def rows_by_expert(routing: Routing, cfg: MoEConfig) -> RowIndex:
    """Flatten the [T, k] routing into rows and group them by expert, in token order inside a group.

    With cfg.capacity_factor (lesson 05), each expert keeps at most C of this rank's rows
    (`capacity.select_within_capacity`), padded to exactly C with cfg.pad_to_capacity; with the
    "probs" policy a group is then in order of weight, highest first.
    """
    T, k = routing.expert_ids.shape
    E = cfg.num_experts
    flat_ids = routing.expert_ids.flatten()  # pair i is (token i // k, slot i % k)
    C = expert_capacity(cfg, T)
    if C is None:
        # Stable sort: rows of one expert stay in token order, so results are reproducible.
        pair = torch.argsort(narrow(flat_ids, E), stable=True)
        return RowIndex(pair, pair // k, flat_ids[pair], count_per_expert(flat_ids, E), every_pair=True,
                        row_of_pair=inverse_permutation(pair).view(T, k))
    pair, counts = select_within_capacity(flat_ids, routing.weights.flatten(), E, C, cfg.drop_policy,
                                          cfg.pad_to_capacity)
    real = pair >= 0
    expert = torch.arange(E * C, device=pair.device) // C if cfg.pad_to_capacity else flat_ids[pair]
    return RowIndex(pair, torch.where(real, pair // k, 0), expert, counts, every_pair=False)


def narrow(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids as 16-bit integers where they fit: a radix sort makes one pass per byte of its keys, so sorting
    int16 keys instead of int64 ones is several times faster (on a CPU too), with the same order."""
    return ids.to(torch.int16) if num_experts <= torch.iinfo(torch.int16).max else ids


class Permute(torch.autograd.Function):
    """x[order] for a permutation `order`, whose inverse is `inverse`. Autograd's own backward of indexing
    scatters with atomic adds, in case an index repeats; a permutation has none, so the gradient is just
    gathered back in place: grad[inverse]."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order`: x[order][inverse] == x."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


@dataclass
class LocalState(DispatchState):
    index: RowIndex  # what each grouped row is
    weights_Tk: torch.Tensor  # the routing weights


class LocalDispatcher(nn.Module):
    """All experts live here: dispatch is a permutation, combine a weighted sum."""

    collective = False  # no collective: bad input just raises
    replicated_tokens = False
    ffn_slice = None

    def __init__(self, cfg: MoEConfig, group=None):
        super().__init__()
        if group is not None:
            raise ValueError(
                "dispatcher 'local' keeps every expert on one device and takes no process group; "
                "use an expert-parallel dispatcher ('allgather', 'alltoall') with group="
            )
        self.cfg = cfg
        self.experts = range(cfg.num_experts)
        self.traffic = Traffic()  # stays empty: nothing leaves the device

    def extra_repr(self) -> str:
        return f"all {self.cfg.num_experts} experts on this device"

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside=None):
        if beside is not None:  # nothing of ours in flight to hide it behind (lesson 09)
            beside()
        index = rows_by_expert(routing, self.cfg)
        rows_RH = rows_of_pairs(x_TH, index)
        if self.cfg.dispatch_dtype is not None:  # lesson 12: what an FP8 dispatch does to the rows, here
            rows_RH = FakeQuantFP8.apply(rows_RH)
        return rows_RH, index.counts, LocalState(index, routing.weights)

    def combine(self, expert_out_RH: torch.Tensor, state: LocalState) -> torch.Tensor:
        return weighted_sum_by_token(expert_out_RH, state.index, state.weights_Tk)

    def abort(self, code: int, message: str, device: torch.device) -> None:
        raise ValueError(message)  # no other rank is waiting


def rows_of_pairs(x_TH: torch.Tensor, index: RowIndex) -> torch.Tensor:
    """The dispatch's gather: row r is token index.token[r]'s. Dropless, its backward sums each token's k rows in one
    pass (`fused.ExpandRows`); with lesson 05's capacity, autograd's own (a scatter-add: a token has 0 to k rows)."""
    if index.every_pair:
        return ExpandRows.apply(x_TH, index.token, index.row_of_pair)
    return x_TH[index.token]


def weighted_sum_by_token(out_RH: torch.Tensor, index: RowIndex, weights_Tk: torch.Tensor) -> torch.Tensor:
    """The combine step: y[t] = Σ_s weights[t, s] · out[the row of pair (t, s)], for rows in the order of
    `index`. A dropped pair has no row and adds nothing; padding rows are left out."""
    T, k = weights_Tk.shape
    H = out_RH.shape[1]
    if index.every_pair:  # each token's k rows gathered, weighted and summed in one pass (`fused.CombineRows`)
        return CombineRows.apply(out_RH, weights_Tk, index.row_of_pair, index.token, index.pair)
    # Lesson 05: dropped pairs stay zero; padding rows land in one spare row, cut off after
    sink = torch.where(index.real, index.pair, T * k)
    by_pair = out_RH.new_zeros(T * k + 1, H).index_copy(0, sink, out_RH)[: T * k]
    # Each token: [1, k] weights @ [k, H] rows, one batched matmul that sums the k products in fp32 inside the GEMM
    # (the weights rounded to the layer's dtype first).
    return torch.bmm(weights_Tk.to(out_RH.dtype).view(T, 1, k), by_pair.view(T, k, H)).view(T, H)
