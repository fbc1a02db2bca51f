"""Expert parallelism × data parallelism: which ranks talk to which (lesson 07).

With W ranks and EP size e, the W ranks form W/e expert-parallel groups of e consecutive ranks;
each EP group holds one full copy of the experts, spread over its e ranks. Ranks that hold the
same experts in different copies (same position in their EP group) form an expert-data-parallel
group of W/e ranks. For W = 4, e = 2:

    EP groups:             {0, 1}  {2, 3}     all_to_all dispatch and combine run here
    expert-DP groups:      {0, 2}  {1, 3}     expert-weight gradients are all-reduced here
    all ranks:             {0, 1, 2, 3}       router and shared-expert (replicated) gradients are all-reduced here
"""
from __future__ import annotations

from dataclasses import dataclass

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
