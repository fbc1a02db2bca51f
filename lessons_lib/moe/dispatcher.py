"""What a dispatcher provides, declared once (lessons 01 to 03, 07).

A dispatcher moves the rows of a rank's tokens to the experts and their results back. The layer calls

    rows_MH, counts_L, state = dispatcher.dispatch(x_TH, routing)    # rows grouped by local expert
    y_TH = dispatcher.combine(expert_out_MH, state)                  # weighted sum of each token's k rows

Shapes (the legend of the dispatch and expert-bank modules; a name ends in its shape, x_TH is [T, H]):
    T  tokens on this rank              k  experts per token (top_k)
    E  experts in all                   L  experts held on this rank (E/N under EP, E otherwise)
    H  hidden size                      F  an expert's inner size (on a TP rank, its slice of F)
    R  rows this rank sends: one per kept (token, slot) pair, grouped by expert
    M  rows this rank's experts receive, from every rank, grouped by local expert
    N  ranks in the process group

`Dispatcher` is the contract every dispatcher meets (local, allgather, alltoall, hierarchical, tp);
`DispatchState` is the base of what dispatch hands to combine; `ExpertParallelDispatcher` is what the EP
dispatchers share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .config import MoEConfig
from .distributed import experts_of_rank, rank_and_size
from .router import Routing
from .traffic import Traffic

# Why a rank's input was refused; the code travels with the first collective so all ranks stop.
INPUT_PROBLEMS = {1: "shape", 2: "dtype", 3: "device", 4: "token_ids"}


@dataclass(kw_only=True)
class DispatchState:
    """The base of every dispatcher's state. sizes: rows per local expert as Python ints [L] where the dispatcher
    already has them on the host (lesson 03's all-to-all reads its split sizes back anyway), so the expert bank
    needs no host sync of its own; None where it has not (the bank then counts on the device)."""

    sizes: list[int] | None = None


@runtime_checkable
class Dispatcher(Protocol):
    """The contract between the layer and a dispatcher."""

    experts: range  # global ids of the experts held on this rank
    ffn_slice: slice | None  # tensor parallelism: the part of every expert's F this rank holds; None: all of it
    collective: bool  # it runs collectives, so a rank with bad input must tell the others before raising
    replicated_tokens: bool  # every rank of the group runs the same tokens (TP); False: each rank its own (EP)
    traffic: Traffic  # what the last forward moved between ranks

    def dispatch(self, x_TH: torch.Tensor, routing: Routing,
                 beside=None) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """-> (rows_MH grouped by local expert, counts_L rows per local expert, state for combine).
        beside: work that needs no communication (lesson 09's shared expert, `overlap.SharedBeside`), called once:
        while the rows travel where the dispatcher can (the all-to-all), else first."""

    def combine(self, expert_out_MH: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """-> y_TH: each token's k results, weighted by the routing and summed. (The all-to-all's also takes
        `beside`, run while the results travel: lesson 09's two micro-batches.)"""

    def abort(self, code: int, message: str, device: torch.device) -> None:
        """Instead of dispatch, when this rank's input is bad: make the other ranks raise too, then raise."""


class ExpertParallelDispatcher(nn.Module):
    """What the expert-parallel dispatchers share (lessons 02 and 03): the group, which experts this rank owns,
    the traffic record, and stopping all ranks together when one rank's input is bad."""

    collective = True
    replicated_tokens = False
    ffn_slice = None

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
        self._first_exchange(torch.zeros(self.cfg.num_experts, dtype=torch.long, device=device), code)
        raise ValueError(message)

    def _first_exchange(self, counts_E: torch.Tensor, code: int):
        """The dispatcher's first collective; it carries `code` (0: input fine) to every rank."""
        raise NotImplementedError
