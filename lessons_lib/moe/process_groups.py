"""Which ranks talk to which: expert parallelism × data parallelism (lesson 07), and nodes (lesson 10).

With W ranks and EP size e, the W ranks form W/e expert-parallel groups of e consecutive ranks;
each EP group holds one full copy of the experts, spread over its e ranks. Ranks that hold the
same experts in different copies (same position in their EP group) form an expert-data-parallel
group of W/e ranks. For W = 4, e = 2:

    EP groups:             {0, 1}  {2, 3}     all_to_all dispatch and combine run here
    expert-DP groups:      {0, 2}  {1, 3}     expert-weight gradients are all-reduced here
    all ranks:             {0, 1, 2, 3}       router and shared-expert (replicated) gradients are all-reduced here
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import all_reduce_grads


@dataclass
class EPDPGroups:
    ep_group: object  # this rank's expert-parallel group
    edp_group: object  # this rank's expert-data-parallel group
    ep_ranks: list  # every EP group, as lists of global ranks
    edp_ranks: list  # every expert-DP group


def build_ep_dp_groups(ep_size: int) -> EPDPGroups:
    """Create every EP and expert-DP group (new_group is collective: all ranks create all groups)
    and return this rank's two."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size <= 0 or world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    ep_ranks = [list(range(start, start + ep_size)) for start in range(0, world, ep_size)]
    edp_ranks = [list(range(pos, world, ep_size)) for pos in range(ep_size)]
    mine = {}
    for kind, table in (("ep", ep_ranks), ("edp", edp_ranks)):
        for ranks in table:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = g
    return EPDPGroups(mine["ep"], mine["edp"], ep_ranks, edp_ranks)


def sync_gradients(layer, groups: EPDPGroups) -> None:
    """Sum the gradients the way EP × DP needs: expert weights over the expert-DP group (the copies of
    the same experts), the replicated router and shared expert (lesson 08) over all ranks."""
    all_reduce_grads(layer.experts.parameters(), group=groups.edp_group)
    all_reduce_grads(layer.replicated_parameters())


# ---------------------------------------------------------------- lesson 10: nodes

@dataclass
class NodeGroups:
    """A world of nodes × ranks_per_node ranks, rank g = node · ranks_per_node + local rank. For 2 × 4:

        intra-node groups:   {0, 1, 2, 3}  {4, 5, 6, 7}          fast links (NVLink): the fan-out inside a node
        inter-node groups:   {0, 4}  {1, 5}  {2, 6}  {3, 7}      one per local rank (a "rail"): the network

    A token crosses between nodes only inside its rank's inter-node group, to the rank of the same local rank.
    """

    ranks_per_node: int
    nodes: int
    node: int  # this rank's node
    local_rank: int  # this rank's place in its node
    intra_group: object  # this rank's node, group rank = local rank
    inter_group: object  # the ranks of this local rank on every node, group rank = node
    intra_ranks: list  # every intra-node group, as lists of global ranks
    inter_ranks: list  # every inter-node group


_NODE_GROUPS: dict = {}  # (id of the world group, R) -> (that group, NodeGroups): new_group is costly, make them once


def default_ranks_per_node() -> int:
    """torchrun's LOCAL_WORLD_SIZE (the processes it started on this machine), else the whole world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


def check_ranks_per_node(ranks_per_node: int, world_size: int) -> None:
    if not isinstance(ranks_per_node, int) or ranks_per_node <= 0 or world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node!r}) must be a positive divisor of the world size "
                         f"({world_size}): the world is nodes × ranks_per_node")


def ranks_per_node_of_every_rank(ranks_per_node) -> list:
    """Every rank's ranks_per_node (an invalid one as None), by one all_gather of one int that every rank of the
    world joins. Ranks that disagree (torchrun started a different number of processes on two machines, so their
    LOCAL_WORLD_SIZE differ) would make different groups and wait in new_group forever."""
    valid = isinstance(ranks_per_node, int) and not isinstance(ranks_per_node, bool) and ranks_per_node > 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([ranks_per_node if valid else -1], device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(v) if int(v) > 0 else None for v in every]


def build_node_groups(ranks_per_node: int | None = None) -> NodeGroups:
    """Every intra-node and inter-node group (new_group is collective: every rank makes every group, in the same
    order) and this rank's two. A ranks_per_node that does not divide the world, or that is not the same on every
    rank, is a ValueError on every rank, after one all_gather of one int that every rank joins (none waits)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    R = default_ranks_per_node() if ranks_per_node is None else ranks_per_node
    every = ranks_per_node_of_every_rank(R)
    if len(set(every)) > 1:
        raise ValueError(f"ranks_per_node differs between ranks ({every}, by rank): every rank must see the same "
                         "number of ranks per node (torchrun's LOCAL_WORLD_SIZE, or the ranks_per_node passed); "
                         "start the same number of processes on every node")
    check_ranks_per_node(R, world)
    world_group = dist.group.WORLD
    key = (id(world_group), R)
    cached = _NODE_GROUPS.get(key)
    if cached is None or cached[0] is not world_group:  # a new init_process_group makes a new world, new groups
        P = world // R
        intra_ranks = [list(range(n * R, (n + 1) * R)) for n in range(P)]
        inter_ranks = [list(range(lr, world, R)) for lr in range(R)]
        mine = {}
        for kind, table in (("intra", intra_ranks), ("inter", inter_ranks)):
            for ranks in table:
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = g
        _NODE_GROUPS[key] = (world_group, NodeGroups(R, P, rank // R, rank % R, mine["intra"], mine["inter"],
                                                     intra_ranks, inter_ranks))
    return _NODE_GROUPS[key][1]
