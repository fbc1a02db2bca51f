"""Redundant experts: which logical expert each physical slot holds (lesson 11).

Under EP the busiest rank sets the pace (lesson 06). What balancing leaves over, a deployment evens out by giving
the hottest experts extra replicas and placing the replicas so that every rank carries about the same load; an
expert's tokens are split evenly over its replicas. `place_experts` does it in two steps:

1. **replicas**: every expert gets one slot; each spare slot goes, one at a time, to the expert whose load per
   replica is then the largest. This makes the largest load per replica as small as it can be for that many
   slots (a heap, highest first);
2. **packing**: the replicas, heaviest first, each go to the rank with the least load that still has a free slot
   and does not hold that expert yet (two replicas on one rank would split nothing), a rank that holds it only
   when no other is free. Largest-first greedy packing is a classic heuristic for minimising the busiest bin
   (Graham's LPT rule).

With `ranks_per_node` (lesson 10) experts stay on one node each, so balancing adds no traffic between nodes and
node-limited routing (a token's experts in at most M groups) still reaches at most M nodes; both steps then run
inside each node, over its slots and ranks. Which experts a node holds: by default its contiguous block, as
lesson 10 placed them; with `group_nodes` (from `nodes_of_groups`) whole expert groups first move between nodes
to even out the nodes' loads, and a token's M groups then lie on the M nodes that map names. DeepSeek's open EPLB
orders its hierarchical policy the same way (groups to nodes, then replicas and GPUs inside each node); this is the
course's own, simpler version.
"""
from __future__ import annotations

import heapq

import torch


def _check(load_E: torch.Tensor, num_ranks: int, slots_per_rank: int) -> None:
    if load_E.dim() != 1 or load_E.numel() == 0:
        raise ValueError(f"load must be a 1-d tensor with one entry per expert, got shape {list(load_E.shape)}")
    if not torch.isfinite(load_E).all() or (load_E < 0).any():
        raise ValueError("every expert's load must be finite and >= 0")
    if num_ranks <= 0 or slots_per_rank <= 0:
        raise ValueError(f"num_ranks and slots_per_rank must be positive, got {num_ranks} and {slots_per_rank}")
    if num_ranks * slots_per_rank < load_E.numel():
        raise ValueError(f"{num_ranks} ranks × {slots_per_rank} slots = {num_ranks * slots_per_rank} slots cannot hold "
                         f"the {load_E.numel()} experts: every expert needs a slot")


def replica_counts(load_E: torch.Tensor, num_slots: int) -> list[int]:
    """How many replicas each expert gets out of num_slots: one each, then every spare slot to the expert with the
    largest load per replica (ties: the lower expert id)."""
    load = load_E.double().tolist()
    replicas = [1] * len(load)
    heap = [(-w, e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(load)):
        _, e = heapq.heappop(heap)
        replicas[e] += 1
        heapq.heappush(heap, (-load[e] / replicas[e], e))
    return replicas


def _pack(experts: list[int], load: list[float], replicas: list[int], num_ranks: int,
          slots_per_rank: int) -> list[list[int]]:
    """Largest-first greedy packing of these experts' replicas onto num_ranks ranks of slots_per_rank slots."""
    items = [(load[e] / replicas[e], e) for e in experts for _ in range(replicas[e])]
    items.sort(key=lambda t: (-t[0], t[1]))
    slots = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for w, e in items:
        free = [r for r in range(num_ranks) if len(slots[r]) < slots_per_rank]
        fresh = [r for r in free if e not in slots[r]] or free
        r = min(fresh, key=lambda r: (rank_load[r], r))
        slots[r].append(e)
        rank_load[r] += w
    return [sorted(s) for s in slots]


def nodes_of_groups(load_E: torch.Tensor, num_groups: int, nodes: int) -> list[int]:
    """The node each expert group goes to (group g: the contiguous experts g·E/G … (g+1)·E/G − 1, as the router's
    groups, lesson 06), G/nodes groups a node, to even out the nodes' loads: the groups, heaviest first, each to the
    least-loaded node that still has room (the packing rule below, one level up)."""
    _check(load_E, 1, load_E.numel())
    E = load_E.numel()
    if num_groups <= 0 or nodes <= 0 or E % num_groups or num_groups % nodes:
        raise ValueError(f"num_groups ({num_groups}) must divide the experts ({E}), and the nodes ({nodes}) the "
                         "groups")
    group_load = load_E.double().view(num_groups, -1).sum(1).tolist()
    node_load, room, node_of = [0.0] * nodes, [num_groups // nodes] * nodes, [0] * num_groups
    for g in sorted(range(num_groups), key=lambda g: (-group_load[g], g)):
        n = min((n for n in range(nodes) if room[n]), key=lambda n: (node_load[n], n))
        node_of[g], node_load[n], room[n] = n, node_load[n] + group_load[g], room[n] - 1
    return node_of


def place_experts(load_E: torch.Tensor, num_ranks: int, slots_per_rank: int,
                  ranks_per_node: int | None = None, group_nodes: list[int] | None = None) -> torch.Tensor:
    """[num_ranks, slots_per_rank] int64: the logical expert each physical slot holds, for per-expert loads [E]
    (token counts or a moving average). Every expert gets at least one slot; see the module for the algorithm.
    ranks_per_node: keep every expert on one node (its contiguous block's, or with group_nodes, the node of its
    group: `nodes_of_groups`). ValueError for too few slots, a negative load, a wrong shape, or nodes that do not
    split ranks and experts."""
    _check(load_E, num_ranks, slots_per_rank)
    E = load_E.numel()
    load = load_E.double().tolist()
    R = num_ranks if ranks_per_node is None else ranks_per_node
    if R <= 0 or num_ranks % R or E % (num_ranks // R):
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the ranks ({num_ranks}), and the nodes "
                         f"the experts ({E})")
    nodes, per_node = num_ranks // R, E // (num_ranks // R)
    if R * slots_per_rank < per_node:
        raise ValueError(f"a node's {R * slots_per_rank} slots cannot hold its {per_node} experts")
    node_experts = [list(range(n * per_node, (n + 1) * per_node)) for n in range(nodes)]
    if group_nodes is not None:
        G = len(group_nodes)
        even = sorted(group_nodes) == sorted(list(range(nodes)) * (G // nodes))  # G/nodes groups on every node
        if ranks_per_node is None or G == 0 or E % G or not even:
            raise ValueError(f"group_nodes must give each of the {nodes} nodes the same number of groups (with "
                             f"ranks_per_node, and groups that split the {E} experts), got {list(group_nodes)}")
        node_experts = [[e for g in range(G) if group_nodes[g] == n for e in range(g * E // G, (g + 1) * E // G)]
                        for n in range(nodes)]
    out = []
    for experts in node_experts:
        counts = replica_counts(load_E[experts], R * slots_per_rank)
        replicas = [0] * E
        for e, c in zip(experts, counts):
            replicas[e] = c
        out += _pack(experts, load, replicas, R, slots_per_rank)
    return torch.tensor(out, dtype=torch.long)


def rank_loads(placement: torch.Tensor, load_E: torch.Tensor) -> torch.Tensor:
    """[num_ranks] the load each rank carries under a placement, an expert's load split evenly over its slots."""
    replicas = torch.bincount(placement.flatten(), minlength=load_E.numel())
    if (replicas == 0).any():
        raise ValueError(f"experts {torch.nonzero(replicas == 0).flatten().tolist()} have no slot")
    return (load_E.double() / replicas)[placement].sum(1)


def contiguous_placement(num_experts: int, num_ranks: int) -> torch.Tensor:
    """The course's placement until lesson 11: rank r holds experts r·E/N … (r+1)·E/N − 1, one slot each."""
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks ({num_ranks})")
    return torch.arange(num_experts).view(num_ranks, -1)


def greedy_placement(load_E: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """A simple baseline: the same replicas, each expert's replicas dealt in expert order to the least-loaded
    rank with a free slot (no sorting). place_experts should never do worse."""
    _check(load_E, num_ranks, slots_per_rank)
    load = load_E.double().tolist()
    counts = replica_counts(load_E, num_ranks * slots_per_rank)
    slots = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    for e, c in enumerate(counts):
        for _ in range(c):
            r = min((r for r in range(num_ranks) if len(slots[r]) < slots_per_rank), key=lambda r: (rank_load[r], r))
            slots[r].append(e)
            rank_load[r] += load[e] / c
    return torch.tensor([sorted(s) for s in slots], dtype=torch.long)


# ---------------------------------------------------------------- the layer's side: replicas of logical experts

def check_same_on_every_rank(placement, group=None) -> None:
    """A ValueError on every rank of `group` if the ranks were given different placements (say, each built from its
    own tokens' loads): each would send pairs to slots that the others think hold other experts, and the outputs
    would be wrong without a word. One all_gather of the placement's shape and two checksums, which every rank
    joins before any rank can refuse the placement alone (so that none is left waiting)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    try:
        p = torch.as_tensor(placement, dtype=torch.long).cpu().flatten()
        shape = list(torch.as_tensor(placement).shape) + [0, 0]
        weights = torch.arange(1, len(p) + 1)
        mine = [shape[0], shape[1], int((p * weights).sum()), int((p * p * (weights + 7)).sum())]
    except (TypeError, ValueError, RuntimeError):
        mine = [-1, -1, -1, -1]  # not a tensor of ints: every rank then refuses it the same way, or they differ
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine_t = torch.tensor(mine, dtype=torch.long, device=device)
    every = [torch.empty_like(mine_t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine_t, group=group)
    differ = [r for r, v in enumerate(every) if not torch.equal(v, every[0])]
    if differ:
        raise ValueError(f"the placement differs between ranks (ranks {differ} differ from the group's first): every "
                         "rank must be given the same placement, built from the loads summed over the group")


class Replicas:
    """A placement in use: physical slot p = rank · slots_per_rank + j holds logical expert slot_expert[p].

    The layer routes over logical experts, then `physical` sends each (token, expert) pair to one of the expert's
    replicas; from there on the dispatcher (lesson 03's or lesson 10's) and the bank see one "expert" per physical slot.
    """

    def __init__(self, placement: torch.Tensor, num_experts: int, rank: int, world_size: int):
        placement = torch.as_tensor(placement, dtype=torch.long).cpu()
        if placement.dim() != 2 or placement.shape[0] != world_size:
            raise ValueError(f"a placement is [ranks={world_size}, slots_per_rank], got shape {list(placement.shape)}")
        if placement.numel() and (placement.min() < 0 or placement.max() >= num_experts):
            raise ValueError(f"a placement holds expert ids 0..{num_experts - 1}")
        count_E = torch.bincount(placement.flatten(), minlength=num_experts)
        if (count_E == 0).any():
            raise ValueError(f"experts {torch.nonzero(count_E == 0).flatten().tolist()} have no slot in the placement")
        self.placement, self.num_experts, self.rank = placement, num_experts, rank
        self.slot_expert = placement.flatten()  # [N·S] physical slot -> logical expert
        self.count_E = count_E  # replicas of each expert
        # [E, most replicas] the physical slots of each expert's replicas, in slot order (-1: none)
        order = torch.argsort(self.slot_expert, stable=True)
        position = torch.arange(len(order)) - (torch.cumsum(count_E, 0) - count_E)[self.slot_expert[order]]
        self.slots_ER = torch.full((num_experts, int(count_E.max())), -1, dtype=torch.long)
        self.slots_ER[self.slot_expert[order], position] = order
        self.mine = placement[rank]  # [S] the logical expert of each of this rank's slots
        # the experts with more than one replica, numbered 0.. in a compact index (-1: a single copy)
        self.replicated = torch.nonzero(count_E > 1).flatten()
        self.compact_E = torch.full((num_experts,), -1, dtype=torch.long)
        self.compact_E[self.replicated] = torch.arange(len(self.replicated))
        # the first replica of each expert stands for it when the weights move (they are all equal)
        self.first_of_mine = self.slots_ER[self.mine, 0] == torch.arange(rank * len(self.mine),
                                                                       (rank + 1) * len(self.mine))

    def physical(self, expert_ids_Tk: torch.Tensor) -> torch.Tensor:
        """The physical slot each (token, slot) pair goes to: the pairs of expert e on this rank, in (token, slot)
        order, take e's replicas in turn, starting from replica `rank` mod its count (so that every rank does
        not start on the same one)."""
        device = expert_ids_Tk.device
        flat = expert_ids_Tk.flatten()
        count = self.count_E.to(device)
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0) - torch.bincount(
            flat, minlength=self.num_experts)
        position = torch.empty_like(flat)
        position[order] = torch.arange(len(flat), device=device) - starts[flat[order]]
        replica = (position + self.rank) % count[flat]
        return self.slots_ER.to(device)[flat, replica].view_as(expert_ids_Tk)

    def logical(self, slot_tensor: torch.Tensor, group=None, first_only: bool = False) -> torch.Tensor:
        """[E, ...] from this rank's [S, ...]: summed over every rank's replicas of each expert (a gradient), or,
        with first_only, each expert's first replica alone (its weights, equal in every replica). One all-reduce
        of an [E, ...] buffer over the group."""
        import torch.distributed as dist

        keep = self.first_of_mine.to(slot_tensor.device) if first_only else None
        buf = slot_tensor.new_zeros(self.num_experts, *slot_tensor.shape[1:])
        mine = self.mine.to(slot_tensor.device)
        src = slot_tensor if keep is None else slot_tensor * keep.view(-1, *[1] * (slot_tensor.dim() - 1))
        buf.index_add_(0, mine, src)
        dist.all_reduce(buf, group=group)
        return buf

    def sum_over_replicas(self, slot_tensor: torch.Tensor, group=None) -> torch.Tensor:
        """This rank's [S, ...] with every slot of a replicated expert replaced by the sum over all of that
        expert's replicas (their gradients, lesson 11's training); single copies are left as they are. One
        all-reduce of a buffer with a row per replicated expert only, and none when nothing is replicated."""
        import torch.distributed as dist

        if len(self.replicated) == 0:  # every rank has the same placement, so every rank skips it
            return slot_tensor
        index = self.compact_E.to(slot_tensor.device)[self.mine.to(slot_tensor.device)]
        keep = index >= 0
        buf = slot_tensor.new_zeros(len(self.replicated), *slot_tensor.shape[1:])
        buf.index_add_(0, index[keep], slot_tensor[keep])
        dist.all_reduce(buf, group=group)
        out = slot_tensor.clone()
        out[keep] = buf[index[keep]]
        return out
