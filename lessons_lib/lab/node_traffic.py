"""What crosses between nodes (lesson 10): a routing's inter-node rows, flat and hierarchical, and their time.

Experts are placed contiguously, so node n owns experts n·E/P … (n+1)·E/P − 1. For the tokens of a rank on node
`node`, one dispatch sends across the network
- flat (lesson 03's all-to-all): one row per (token, slot) whose expert is on another node (`remote_pairs`);
- hierarchical (lesson 10): one row per (token, other node holding any of its experts) (`remote_nodes`).
Combine sends as many rows back. Node-limited routing (`MoEConfig(router="sigmoid_bias", num_groups=P,
topk_groups=M)`) caps the nodes a token reaches at M, so its hierarchical rows at M remote nodes (M − 1 when its
own node is among them).

`layer_time_us` turns bytes into time with one bandwidth per link class: within a node, NVLink, across nodes the
network; `LINKS` states the figures and where they come from.
"""
from __future__ import annotations

import torch

from ..moe.dispatch_hierarchical import node_hits

# Bandwidth per GPU and direction, GB/s. The model uses DeepSeek-V3's figures (nvlink_h800, network); DeepEP's
# measured ones show what its kernels reach on the same links.
LINKS = {
    "nvlink_h100": (450.0, "NVLink 4 on H100/H200: 900 GB/s per GPU both directions together (NVIDIA's datasheet)"),
    "nvlink_h800": (160.0, "NVLink on DeepSeek-V3's H800s: 160 GB/s (DeepSeek-V3 report, sec. 3.2.2)"),
    "network": (50.0, "InfiniBand, one 400 Gb/s NIC per GPU: 50 GB/s (DeepSeek-V3 report, sec. 3.2.2)"),
    "deepep_nvlink": (153.0, "DeepEP's normal kernels inside a node (EP 8, H800), measured: 153 GB/s dispatch, 158 "
                             "combine (DeepEP, docs/legacy.md)"),
    "deepep_rdma": (43.0, "DeepEP's normal kernels across nodes (EP 16/32/64), measured RDMA: 43/58/51 GB/s dispatch, "
                          "43/57/50 combine (docs/legacy.md; the first table, until 2025-04-22, read 43-47)"),
}


def node_of(expert_ids: torch.Tensor, num_experts: int, nodes: int) -> torch.Tensor:
    """The node that holds each expert id."""
    if num_experts % nodes:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of nodes ({nodes})")
    return expert_ids // (num_experts // nodes)


def nodes_per_token(expert_ids_Tk: torch.Tensor, num_experts: int, nodes: int) -> torch.Tensor:
    """[T] how many different nodes each token's k experts are on."""
    node_of(expert_ids_Tk, num_experts, nodes)  # checks that the nodes split the experts evenly
    return node_hits(expert_ids_Tk, num_experts // nodes, nodes).sum(1)


def remote_nodes_per_token(expert_ids_Tk: torch.Tensor, num_experts: int, nodes: int, node: int) -> torch.Tensor:
    """[T] how many nodes other than `node` each token's experts are on: its hop-1 rows over the network."""
    node_of(expert_ids_Tk, num_experts, nodes)
    hit_TP = node_hits(expert_ids_Tk, num_experts // nodes, nodes)
    hit_TP[:, node] = False
    return hit_TP.sum(1)


def remote_pairs(expert_ids_Tk: torch.Tensor, num_experts: int, nodes: int, node: int) -> int:
    """Flat: the rows a rank on `node` sends across the network in one dispatch, one per remote (token, slot)."""
    return int((node_of(expert_ids_Tk, num_experts, nodes) != node).sum())


def remote_nodes(expert_ids_Tk: torch.Tensor, num_experts: int, nodes: int, node: int) -> int:
    """Hierarchical: the rows a rank on `node` sends across the network, one per (token, remote node)."""
    return int(remote_nodes_per_token(expert_ids_Tk, num_experts, nodes, node).sum())


def split_bytes_by_link(splits: list[int], rank: int, ranks_per_node: int, row_bytes: int) -> dict[str, int]:
    """Bytes of an all-to-all's per-rank split sizes that leave `rank`, by link: {"intra-node", "inter-node"}
    (the rows to itself stay put)."""
    node = rank // ranks_per_node
    out = {"intra-node": 0, "inter-node": 0}
    for r, n in enumerate(splits):
        if r != rank:
            out["intra-node" if r // ranks_per_node == node else "inter-node"] += n * row_bytes
    return out


def rows_by_link(expert_ids_Tk: torch.Tensor, num_experts: int, nodes: int, ranks_per_node: int,
                 rank: int) -> dict[str, dict[str, int]]:
    """One dispatch of these tokens on `rank`, counted from the routing alone: the rows each scheme sends over
    each link class, {"flat" | "hierarchical": {"inter-node", "intra-node"}} (combine sends as many back).

    flat: a row per (token, slot); it crosses the network if the expert is on another node, NVLink if it is on
    another rank of this node. hierarchical: a row per (token, remote node) crosses the network, to the rank with
    this rank's local rank there; then a row per (token, rank holding any of its experts) crosses NVLink where that
    rank's local rank is not this rank's (the token's own node included)."""
    per_rank = num_experts // (nodes * ranks_per_node)
    expert_rank = expert_ids_Tk // per_rank
    expert_node = expert_rank // ranks_per_node
    node, local = rank // ranks_per_node, rank % ranks_per_node
    rank_hits_TN = node_hits(expert_ids_Tk, per_rank, nodes * ranks_per_node)  # [T, ranks]: a token's ranks
    forwarded = torch.arange(nodes * ranks_per_node, device=expert_ids_Tk.device) % ranks_per_node != local
    return {"flat": {"inter-node": int((expert_node != node).sum()),
                     "intra-node": int(((expert_node == node) & (expert_rank != rank)).sum())},
            "hierarchical": {"inter-node": remote_nodes(expert_ids_Tk, num_experts, nodes, node),
                             "intra-node": int(rank_hits_TN[:, forwarded].sum())}}


def layer_time_us(rows: dict[str, int], hidden: int, bytes_per_element: float, nvlink_gbs: float,
                  network_gbs: float, overlapped: bool = False,
                  dispatch_bytes_per_element: float | None = None) -> float:
    """Dispatch + combine time of one layer, in µs, for {"inter-node", "intra-node"} rows of one dispatch (combine
    moves as many), each link class at its bandwidth: one after the other (overlapped False, a serial bound), or
    both links busy at once, as DeepEP's kernels forward rows while they receive them (True: the larger of the
    two, the best case). dispatch_bytes_per_element: the dispatch's rows in another format than the combine's
    (lesson 12's FP8 wire: 1 byte a value and a 4-byte scale per 128, 1.03125), else bytes_per_element both ways."""
    def one_way(b):
        inter, intra = rows["inter-node"] * hidden * b / network_gbs, rows["intra-node"] * hidden * b / nvlink_gbs
        return max(inter, intra) if overlapped else inter + intra

    dispatch = bytes_per_element if dispatch_bytes_per_element is None else dispatch_bytes_per_element
    return (one_way(dispatch) + one_way(bytes_per_element)) / 1e3


def tp_time_us(tokens: int, hidden: int, group_size: int, bytes_per_element: int, link_gbs: float) -> float:
    """Lesson 07's TP all-reduce of a [tokens, hidden] output over a ring of group_size ranks, in µs, at the
    bandwidth of its slowest link (a ring that spans nodes runs at the network's)."""
    return 2 * (group_size - 1) / group_size * tokens * hidden * bytes_per_element / link_gbs / 1e3
