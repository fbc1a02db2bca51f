"""Expert parallelism across nodes: a token crosses to each remote node once (lesson 10).

Lesson 03 sends one row per (token, expert) pair straight to the rank that owns the expert, so a token whose k
experts all live on one remote node crosses the network k times. Here the world is nodes × ranks_per_node
(`process_groups.NodeGroups`), and a token travels in two hops, as DeepEP's normal kernels do:

  1. inter-node: one row per (token, destination node), to the rank with the same local rank on that node
     (the row for the token's own node stays on its rank), with the token's k slots beside it: the global
     expert id where that expert is on the destination node, else -1, and the slot's routing weight (else 0);
  2. intra-node: the receiving rank forwards each row once to every rank of its node that holds any of the row's
     experts (its own included, where the row stays), with the slots that rank takes beside it;
  3. each rank expands its rows to their (row, slot) pairs, grouped by local expert, and its experts run;
  4. combine, in reverse, summing at every step back: each rank weights and sums a row's results over its own
     slots into one partial row, which goes back inside the node once per (row, rank); hop 1's receiver adds up
     its node's partials, which cross back once per (token, node); the token's rank adds up its nodes' partials.

DeepEP's normal kernels (prefill and training) move a token the same way: over the network once per destination
node, over NVLink once per destination rank. Its low-latency kernels (decode) forward nothing: each (token, expert)
pair goes straight to the expert's rank, one message per top-k slot, as lesson 03 does.

Every rank takes part in every collective, also with nothing to send. The weights travel through the same
differentiable all-to-all as the rows, so the router's gradient comes back the way they went (in backward that
is k numbers per row more on both hops, which `traffic`, a record of the forward, does not count). `traffic` splits
the bytes by link class: "dispatch inter-node", "dispatch intra-node", "combine inter-node", "combine
intra-node", and the slots' ids and weights beside the rows as "metadata inter-node" and "metadata intra-node".

Shapes as in `dispatcher`, and: P nodes, Rn ranks per node, U rows of (token, destination node) this rank sends in
hop 1, V rows it receives there, W rows of (received row, destination rank) it sends in hop 2, X rows it receives
there, M the (row, slot) pairs of those X rows that its experts take.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch_alltoall import AllToAll, all_to_all_beside, capturing, read_later
from .dispatcher import DispatchState, ExpertParallelDispatcher
from .process_groups import build_node_groups, default_ranks_per_node
from .router import Routing, count_per_expert
from .traffic import Traffic
from .wire import dispatch_row_bytes, wire_for


@dataclass
class HierarchicalState(DispatchState):
    num_tokens: int  # T, this rank's tokens
    token_U: torch.Tensor  # the source token of each hop-1 row (rows ordered by destination node, then token)
    node_U: torch.Tensor  # and its destination node
    hop1_sent: list  # [P] hop-1 rows sent to each node
    hop1_received: list  # [P] hop-1 rows received from each node
    row_W: torch.Tensor  # the received hop-1 row each hop-2 row forwards (rows ordered by destination rank, then row)
    rank_W: torch.Tensor  # and the local rank it goes to
    hop2_sent: list  # [Rn] hop-2 rows sent to each rank of the node
    hop2_received: list  # [Rn] hop-2 rows received from each
    weight_Xk: torch.Tensor  # the received hop-2 rows' slot weights (0 for slots on other ranks)
    row_M: torch.Tensor  # the received hop-2 row of each pair the experts take (pairs grouped by local expert)
    slot_M: torch.Tensor  # and which of its k slots


def node_hits(expert_ids_Tk: torch.Tensor, experts_per_node: int, nodes: int) -> torch.Tensor:
    """[T, P] whether token t has any of its k experts on node n (experts placed contiguously, node by node):
    hop 1 sends token t to node n exactly where this is True, so .sum(0) are hop 1's split sizes."""
    hit_TP = torch.zeros(expert_ids_Tk.shape[0], nodes, dtype=torch.bool, device=expert_ids_Tk.device)
    return hit_TP.scatter_(1, expert_ids_Tk // experts_per_node, True)


def _exchange_ints(send: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single of an integer tensor with one row per rank of `group` (no gradient: sizes and ids)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


class HierarchicalDispatcher(ExpertParallelDispatcher):
    """Two hops: once per (token, node) between nodes, then once per (token, rank) inside the node."""

    def __init__(self, cfg, group=None, ranks_per_node: int | None = None):
        if group is not None:
            raise ValueError("dispatcher 'hierarchical' spans the whole world, nodes × ranks_per_node, and makes its "
                             "own groups: leave group=None")
        if cfg.capacity_factor is not None:
            raise ValueError("dispatcher 'hierarchical' is dropless: leave capacity_factor=None (lesson 05's "
                             "capacity works with 'alltoall')")
        super().__init__(cfg, None)  # ValueError if the experts do not split evenly over the ranks
        R = default_ranks_per_node() if ranks_per_node is None else ranks_per_node
        # ValueError on every rank if R does not divide the world or differs between ranks (checked by one small
        # all_gather that every rank joins, before new_group, which would wait for ranks making other groups)
        self.topology = build_node_groups(R)
        self.experts_per_node = cfg.num_experts // self.topology.nodes
        self.wire = wire_for(cfg)  # lesson 12: None, or the rows travel in FP8 on both hops

    def extra_repr(self) -> str:
        t = self.topology
        return (f"{super().extra_repr()}; node {t.node} of {t.nodes}, local rank {t.local_rank} of "
                f"{t.ranks_per_node}")

    def _first_exchange(self, send_N: torch.Tensor, code: int) -> torch.Tensor:
        # Over the whole world, so that a bad input on any rank reaches every rank: row g = [hop-1 rows for
        # rank g, code]. Only the ranks of this rank's inter-node group get rows.
        send = torch.stack([send_N, torch.full_like(send_N, code)], dim=1)
        recv = _exchange_ints(send, None)
        nbytes = (self.world_size - 1) * 2 * 8
        self.traffic.add("counts", nbytes, nbytes, 0)
        return recv  # [N, 2]: row g = what rank g will send me in hop 1, and its code

    def abort(self, code: int, message: str, device: torch.device) -> None:
        self._first_exchange(torch.zeros(self.world_size, dtype=torch.long, device=device), code)
        raise ValueError(message)

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside=None):
        if capturing():
            raise RuntimeError("dispatcher 'hierarchical' reads its split sizes back from the GPU and has no "
                               "CUDA-graph path; use 'alltoall' with lesson 05's static shapes")
        t = self.topology
        P, Rn, L = t.nodes, t.ranks_per_node, self.num_local_experts
        self.traffic = Traffic()
        ids_Tk = routing.expert_ids
        node_Tk = ids_Tk // self.experts_per_node

        # Hop 1: one row per (token, node its experts live on), ordered by node, then token.
        hit_TP = node_hits(ids_Tk, self.experts_per_node, P)
        node_U, token_U = hit_TP.t().nonzero(as_tuple=True)
        on_node_Uk = node_Tk[token_U] == node_U[:, None]
        expert_Uk = torch.where(on_node_Uk, ids_Tk[token_U], -1)
        weight_Uk = torch.where(on_node_Uk, routing.weights[token_U], 0.0)
        send_P = hit_TP.sum(0)
        peers = torch.arange(P, device=x_TH.device) * Rn + t.local_rank  # my inter-node group, by node
        send_N = torch.zeros(self.world_size, dtype=torch.long, device=x_TH.device)
        send_N[peers] = send_P
        recv = self._first_exchange(send_N, 0)
        read_sizes = read_later(torch.cat([send_P, recv[peers, 0], recv[:, 1]]))  # one host sync for the split sizes
        rows_UH = x_TH[token_U]  # gathered while the host waits (lesson 03's `read_later`)
        sizes = read_sizes()
        hop1_sent, hop1_received, codes = sizes[:P], sizes[P:2 * P], sizes[2 * P:]
        self._stop_if_any_rank_failed(codes)
        if beside is None:
            rows_VH = AllToAll.apply(rows_UH, hop1_received, hop1_sent, t.inter_group, self.wire)
        else:  # lesson 09: the shared expert runs while the rows cross
            rows_VH = all_to_all_beside(rows_UH, hop1_received, hop1_sent, t.inter_group, beside, self.wire)
        # differentiable, so the router's gradient comes back
        weight_Vk = AllToAll.apply(weight_Uk, hop1_received, hop1_sent, t.inter_group)
        expert_Vk = torch.empty(sum(hop1_received), ids_Tk.shape[1], dtype=ids_Tk.dtype, device=x_TH.device)
        dist.all_to_all_single(expert_Vk, expert_Uk.contiguous(), hop1_received, hop1_sent, group=t.inter_group)

        # Hop 2, inside the node: one row per (received row, rank of this node holding any of its experts),
        # ordered by destination rank, then row, with the slots that rank takes beside it (the rank's local expert
        # id, else -1, and the weight, else 0); the rank expands each row to its experts itself.
        E0 = t.node * self.experts_per_node  # this node's first expert
        rank_Vk = torch.where(expert_Vk >= 0, (expert_Vk - E0) // L, Rn)  # Rn: a slot on another node
        hit_VR = torch.zeros(rank_Vk.shape[0], Rn + 1, dtype=torch.bool, device=x_TH.device)
        hit_VR = hit_VR.scatter_(1, rank_Vk, True)[:, :Rn]
        rank_W, row_W = hit_VR.t().nonzero(as_tuple=True)
        on_rank_Wk = rank_Vk[row_W] == rank_W[:, None]
        local_expert_Wk = torch.where(on_rank_Wk, expert_Vk[row_W] - E0 - rank_W[:, None] * L, -1)
        weight_Wk = torch.where(on_rank_Wk, weight_Vk[row_W], 0.0)
        hop2_sent_R = hit_VR.sum(0)
        read_sizes = read_later(torch.cat([hop2_sent_R, _exchange_ints(hop2_sent_R, t.intra_group)]))
        rows_WH = rows_VH[row_W]
        sizes = read_sizes()
        hop2_sent, hop2_received = sizes[:Rn], sizes[Rn:]
        # lesson 12: re-encoding rows that arrived in FP8 gives the same values back (`fp8`: power-of-two scales)
        rows_XH = AllToAll.apply(rows_WH, hop2_received, hop2_sent, t.intra_group, self.wire)
        weight_Xk = AllToAll.apply(weight_Wk, hop2_received, hop2_sent, t.intra_group)
        expert_Xk = torch.empty(sum(hop2_received), ids_Tk.shape[1], dtype=ids_Tk.dtype, device=x_TH.device)
        dist.all_to_all_single(expert_Xk, local_expert_Wk.contiguous(), hop2_received, hop2_sent,
                               group=t.intra_group)

        # Here, each received row expands to its (row, slot) pairs, grouped by local expert for the bank.
        row_M, slot_M = (expert_Xk >= 0).nonzero(as_tuple=True)
        expert_M = expert_Xk[row_M, slot_M]
        by_expert = torch.argsort(expert_M, stable=True)
        row_M, slot_M = row_M[by_expert], slot_M[by_expert]
        counts_L = count_per_expert(expert_M, L)
        read_sizes = read_later(counts_L)
        rows_MH = rows_XH[row_M]
        bank_sizes = read_sizes()

        self._count("dispatch", dispatch_row_bytes(self.cfg, self.wire), hop1_sent, hop1_received, hop2_sent,
                    hop2_received)
        meta = ids_Tk.shape[1] * (expert_Uk.element_size() + weight_Uk.element_size())
        self._count("metadata", meta, hop1_sent, hop1_received, hop2_sent, hop2_received)
        self.traffic.add("counts", (Rn - 1) * 8, (Rn - 1) * 8, 0)
        state = HierarchicalState(ids_Tk.shape[0], token_U, node_U, hop1_sent, hop1_received, row_W, rank_W,
                                  hop2_sent, hop2_received, weight_Xk, row_M, slot_M, sizes=bank_sizes)
        return rows_MH, counts_L, state

    def combine(self, expert_out_MH: torch.Tensor, state: HierarchicalState) -> torch.Tensor:
        t = self.topology
        H = expert_out_MH.shape[1]
        # Each received hop-2 row's results in its k slots (zeros off this rank), weighted and summed by a bmm, as
        # lesson 03's combine: placed, not scatter-added, so the sum is deterministic and accumulates in fp32. Each
        # hop's partial rows are in the layer's dtype, so in bf16 the sum is rounded once per hop.
        X, k = state.weight_Xk.shape
        out_XkH = expert_out_MH.new_zeros(X, k, H).index_put((state.row_M, state.slot_M), expert_out_MH)
        partial_XH = torch.bmm(state.weight_Xk.to(out_XkH.dtype).unsqueeze(1), out_XkH).squeeze(1)
        partial_WH = AllToAll.apply(partial_XH, state.hop2_sent, state.hop2_received, t.intra_group)  # once per rank
        # hop 1's receiver adds up a row's partials from the ranks of its node (placed in a [V, Rn, H] buffer and
        # summed, not index_add_-ed, for a deterministic sum), then they cross back once per node
        by_rank_VRH = partial_WH.new_zeros(sum(state.hop1_received), t.ranks_per_node, H)
        partial_VH = by_rank_VRH.index_put((state.row_W, state.rank_W), partial_WH).sum(1)
        partial_UH = AllToAll.apply(partial_VH, state.hop1_sent, state.hop1_received, t.inter_group)
        # a token's partial rows, one per node it reached, added up the same way
        by_node_TPH = partial_UH.new_zeros(state.num_tokens, t.nodes, H)
        y_TH = by_node_TPH.index_put((state.token_U, state.node_U), partial_UH).sum(1)
        self._count("combine", H * expert_out_MH.element_size(), state.hop1_received, state.hop1_sent,
                    state.hop2_received, state.hop2_sent)
        return y_TH

    def _count(self, phase: str, row_bytes: int, hop1_sent, hop1_received, hop2_sent, hop2_received) -> None:
        """Bytes of rows that leave this rank, by link: hop 1 to other nodes, hop 2 to the other ranks of the node."""
        t = self.topology
        inter = sum(hop1_sent[n] for n in range(t.nodes) if n != t.node) * row_bytes
        inter_in = sum(hop1_received[n] for n in range(t.nodes) if n != t.node) * row_bytes
        self.traffic.add(f"{phase} inter-node", inter, inter_in, inter)
        others = [r for r in range(t.ranks_per_node) if r != t.local_rank]
        intra = sum(hop2_sent[r] for r in others) * row_bytes
        self.traffic.add(f"{phase} intra-node", intra, sum(hop2_received[r] for r in others) * row_bytes, intra)
