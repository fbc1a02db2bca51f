"""The MoE layer: a router, a dispatcher and an expert bank, composed (lesson 01).

    y = Σ_{e in top-k(x)} weight_e(x) · expert_e(x)

Each lesson swaps one part by name: lessons 02, 03 and 07 the dispatcher (what every dispatcher
provides: `dispatcher.Dispatcher`), lesson 04 the expert bank, lesson 06 the router (`cfg.router`).
Lesson 05's capacity is a config option that every dispatcher honours (`dispatch_local.rows_by_expert`).
Lesson 06 adds the hash router, which routes by token id: `layer(x, token_ids=ids)`. Lesson 08 adds the shared
expert (`shared_expert`); lesson 09 runs it while the dispatch's rows travel (`overlap`), and runs a layer as two
micro-batches (`two_batch`). Lesson 10's dispatcher crosses nodes once per (token, node):
`MoELayer(cfg, "hierarchical", ranks_per_node=R)`. Lesson 11 places redundant experts, behind either of those two
dispatchers: `MoELayer(cfg, "alltoall", placement=P)`. Lesson 14 puts the layer inside a model (`lessons_lib.model`),
and lesson 15 runs its decode steps with fixed sizes (`static_decode`).
`MoELayer(cfg, dispatcher="alltoall", experts="grouped", group=ep_group)` is the course's final layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .capacity import dropped_pairs, expert_capacity
from .config import ROUTES_BY_ID, MoEConfig
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoall import AllToAllDispatcher, capturing
from .dispatch_hierarchical import HierarchicalDispatcher
from .dispatch_local import LocalDispatcher
from .dispatcher import Dispatcher, DispatchState
from .distributed import rank_and_size
from .experts import LoopExperts
from .experts_batched import BmmExperts, GroupedExperts
from .experts_fp4 import Fp4Experts
from .experts_fp8 import Fp8Experts
from .hash_router import HashRouter, TableRouter
from .init import expert_weight_shapes
from .load_balancing import SigmoidBiasRouter, router_z_loss
from .overlap import SharedBeside
from .placement import Replicas, check_same_on_every_rank
from .router import Routing, TopKRouter, load_balancing_loss
from .shared_expert import SharedExpert
from .tensor_parallel import TensorParallelDispatcher

ROUTERS: dict[str, type[nn.Module]] = {  # chosen by cfg.router
    "softmax_topk": TopKRouter,  # lesson 01: Mixtral / Qwen-MoE
    "sigmoid_bias": SigmoidBiasRouter,  # lesson 06: DeepSeek-V3
    "hash": HashRouter,  # lesson 06: Roller et al.'s hash layers
    "table": TableRouter,  # lesson 06: DeepSeek-V4's first layers, a stored table by token id
}

DISPATCHERS: dict[str, type[nn.Module]] = {
    "local": LocalDispatcher,  # lesson 01: every expert on this device
    "allgather": AllGatherDispatcher,  # lesson 02: expert parallel, padded all_gather
    "alltoall": AllToAllDispatcher,  # lesson 03: expert parallel, all_to_all_single
    "tp": TensorParallelDispatcher,  # lesson 07: tensor parallel, for comparison
    "hierarchical": HierarchicalDispatcher,  # lesson 10: across nodes, once per (token, node)
}
PLACED_DISPATCHERS = ("alltoall", "hierarchical")  # lesson 11: those that take a placement of replicas
EXPERT_BANKS: dict[str, type[nn.Module]] = {
    "loop": LoopExperts,  # lesson 01: one expert after the other
    "bmm": BmmExperts,  # lesson 04: padded to the largest group, batched matmul
    "grouped": GroupedExperts,  # lesson 04: one grouped GEMM over variable-size groups
    "fp8": Fp8Experts,  # lesson 13: the grouped GEMMs in FP8
    "fp4": Fp4Experts,  # lesson 13: FP4 (MXFP4) weights, dequantized before each GEMM
}


@dataclass
class MoEAux:
    """What the layer reports beside its output, for the losses and the plots.

    aux_loss: the load-balancing loss of this rank's tokens (`router.load_balancing_loss`).
    z_loss: the router z-loss of this rank's tokens (`load_balancing.router_z_loss`).
    tokens_per_expert: [E] int64, (token, slot) pairs this rank's tokens chose for each expert
        (before any capacity limit: the router's demand).
    routing: the router's full decision.
    capacity: C, the most pairs an expert takes from this rank (None: dropless, lesson 05).
    dropped: how many of this rank's T·k pairs went over capacity.
    """

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    routing: Routing
    capacity: int | None = None
    dropped: torch.Tensor | None = None

    @property
    def drop_rate(self) -> float:
        """The fraction of this rank's (token, slot) pairs dropped (0.0 when dropless)."""
        pairs = self.routing.expert_ids.numel()
        return float(self.dropped) / pairs if pairs and self.dropped is not None else 0.0


def _pick(kind: str, name: str, registry: dict):
    if name not in registry:
        raise ValueError(f"MoELayer {kind} must be one of {sorted(registry)}, got {name!r}")
    return registry[name]


class MoELayer(nn.Module):
    """x [T, H] -> (y [T, H], MoEAux).

    dispatcher: how rows reach the experts ("local": all experts on this device).
    experts: how the expert bank runs its experts ("loop": one after the other).
    group: the process group of a parallel dispatcher, EP or TP (None: all ranks);
        "local" takes none.

    overlap: lesson 09, with a shared expert (cfg.shared_ffn_dim): run it while the dispatch's rows travel
        (`overlap.SharedBeside`); False runs the same steps without overlap, to compare.
    ranks_per_node: lesson 10's "hierarchical" dispatcher, the world as nodes × ranks_per_node (None: torchrun's
        LOCAL_WORLD_SIZE).
    placement: lesson 11's redundant experts, [ranks, slots_per_rank] logical expert ids (`placement.place_experts`),
        behind "alltoall" or "hierarchical" (a node-aware placement keeps every replica on its expert's node).

    The forward is four steps, each a method (the benchmark times them one by one):
    route -> dispatch -> run_experts -> combine, and with a shared expert (lesson 08) y += shared(x).
    token_ids [T]: the tokens' ids, which the hash router (lesson 06) routes by; the other routers ignore them.
    """

    def __init__(self, cfg: MoEConfig, dispatcher: str = "local", experts: str = "loop", group=None,
                 overlap: bool = True, ranks_per_node: int | None = None, placement: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.overlap = overlap
        kind = _pick("dispatcher", dispatcher, DISPATCHERS)
        if ranks_per_node is not None and dispatcher != "hierarchical":
            raise ValueError(f"ranks_per_node is for dispatcher 'hierarchical' (lesson 10), not {dispatcher!r}")
        extra = {"ranks_per_node": ranks_per_node} if dispatcher == "hierarchical" else {}
        self.replicas, slots_cfg = None, cfg
        if placement is not None:  # lesson 11: the dispatcher and the bank see one "expert" per physical slot
            # physical slot p lives on rank p // slots_per_rank, so both EP dispatchers that send each pair to its
            # slot's rank (lesson 03's directly, lesson 10's through the slot's node) serve replicas unchanged
            if dispatcher not in PLACED_DISPATCHERS or cfg.capacity_factor is not None:
                raise ValueError(f"a placement (lesson 11) needs dispatcher 'alltoall' or 'hierarchical' and no "
                                 f"capacity_factor, got {dispatcher!r}")
            check_same_on_every_rank(placement, group)  # before any rank can refuse it alone
            self.replicas = Replicas(placement, cfg.num_experts, *rank_and_size(group))
            slots_cfg = dataclasses.replace(cfg, num_experts=len(self.replicas.slot_expert), router="softmax_topk",
                                            num_groups=1, topk_groups=None, routed_scaling_factor=1.0, vocab_size=None)
        self.dispatcher: Dispatcher = kind(slots_cfg, group, **extra)
        self.router = ROUTERS[cfg.router](cfg)
        # The dispatcher knows which experts this rank owns (and, under tensor parallelism, which
        # part of each expert's inner dimension); the bank holds just those weights.
        self.experts = _pick("experts", experts, EXPERT_BANKS)(slots_cfg, self.dispatcher.experts,
                                                                self.dispatcher.ffn_slice)
        self.shared = SharedExpert(cfg) if cfg.shared_ffn_dim is not None else None

    def forward(self, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None):
        self.check_input(x_TH, token_ids)
        routing = self.route(x_TH, token_ids)
        beside = SharedBeside(self.shared, x_TH, self.overlap) if self.shared is not None else None
        rows_MH, counts_L, state = self.dispatch(x_TH, routing, beside)
        y_TH = self.combine(self.run_experts(rows_MH, counts_L, state), state)
        if beside is not None:
            y_TH = y_TH + beside.result()
        return y_TH, self.aux(routing)

    def route(self, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        """Step 1: which k experts each token goes to, and with what weight."""
        return self.router(x_TH, token_ids)

    def dispatch(self, x_TH: torch.Tensor, routing: Routing, beside: SharedBeside | None = None):
        """Step 2: the rows of this rank's experts, grouped by local expert -> (rows_MH, counts_L, state);
        `beside` (lesson 09's shared expert) runs while they travel."""
        if self.replicas is not None:  # lesson 11: each pair goes to one replica of its expert
            routing = dataclasses.replace(routing, expert_ids=self.replicas.physical(routing.expert_ids))
        return self.dispatcher.dispatch(x_TH, routing, beside)

    def run_experts(self, rows_MH: torch.Tensor, counts_L: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Step 3: the expert bank on the dispatched rows. Where the dispatcher has the row counts on the host
        (`state.sizes`, lesson 03's all-to-all), the bank takes them and has no host sync of its own."""
        return self.experts(rows_MH, counts_L, state.sizes)

    def combine(self, expert_out_MH: torch.Tensor, state: DispatchState, beside=None) -> torch.Tensor:
        """Step 4: the results back to their tokens, weighted and summed -> y_TH. `beside`: work run while the
        results travel (the all-to-all only: lesson 09's two micro-batches, `two_batch`)."""
        if beside is None:
            return self.dispatcher.combine(expert_out_MH, state)
        return self.dispatcher.combine(expert_out_MH, state, beside)

    def aux(self, routing: Routing) -> MoEAux:
        """What the layer reports beside its output: the losses and the load (lessons 01, 05, 06)."""
        E = self.cfg.num_experts
        demand_E = routing.tokens_per_expert(E)
        C = expert_capacity(self.cfg, routing.expert_ids.shape[0])
        return MoEAux(load_balancing_loss(routing, E), router_z_loss(routing), demand_E, routing,
                      capacity=C, dropped=dropped_pairs(demand_E, C))

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank of an expert-parallel group holds whole: the router's and the shared expert's
        (lesson 08). Each copy's gradient comes from its own rank's tokens, so it is summed over the group."""
        shared = list(self.shared.parameters()) if self.shared is not None else []
        return list(self.router.parameters()) + shared

    @property
    def device(self) -> torch.device:
        # every bank holds its weights (a frozen FP4 bank as buffers); the hash router has no weight
        return next(iter([*self.experts.parameters(), *self.experts.buffers()])).device

    def check_input(self, x, token_ids=None) -> None:
        """A clear ValueError for an input this layer cannot take, raised on every rank of a parallel layer
        before any collective: the bad rank tells the others through the dispatcher's first collective."""
        problem = self._input_problem(x, token_ids)
        if problem is None:
            return
        code, message = problem
        if self.dispatcher.collective:  # the other ranks are about to wait for us in a collective
            self.dispatcher.abort(code, message, self.device)
        raise ValueError(message)

    def _input_problem(self, x, token_ids=None) -> tuple[int, str] | None:
        """(code, message) if x (or token_ids) cannot be this layer's input; the codes are those of
        `dispatcher.INPUT_PROBLEMS`, which parallel dispatchers send to the other ranks."""
        H, dtype, device = self.cfg.hidden_dim, self.cfg.torch_dtype, self.device
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != H:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            return 1, f"MoELayer input must have shape [tokens, hidden_dim={H}], got {shape}"
        if x.dtype != dtype:
            return 2, f"MoELayer input dtype must be {dtype} (cfg.dtype), got {x.dtype}"
        if x.device != device:
            return 3, f"MoELayer input is on {x.device} but the layer is on {device}"
        if token_ids is None:
            if self.cfg.router in ROUTES_BY_ID:
                return 4, f"router={self.cfg.router!r} routes by token id: call the layer as layer(x, token_ids=ids)"
            return None
        if (not isinstance(token_ids, torch.Tensor) or token_ids.shape != (x.shape[0],)
                or token_ids.dtype not in (torch.int32, torch.int64) or token_ids.device != device):
            got = (f"{list(token_ids.shape)} {token_ids.dtype} on {token_ids.device}"
                   if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__)
            return 4, f"MoELayer token_ids must be an integer tensor [tokens={x.shape[0]}] on {device}, got {got}"
        # reading the minimum waits for the GPU, which a CUDA graph's recording cannot (lesson 15's StaticDecode)
        if token_ids.numel() and not capturing():
            low, high = (int(v) for v in torch.aminmax(token_ids))
            if low < 0:
                return 4, "MoELayer token_ids must be >= 0"
            if self.cfg.vocab_size is not None and high >= self.cfg.vocab_size:
                return 4, f"MoELayer token_ids must be < vocab_size={self.cfg.vocab_size} (the table's rows): {high}"
        return None

    @torch.no_grad()
    def sum_replica_grads(self) -> None:
        """Lesson 11: the replicas of one expert saw different tokens; give each the sum of all its replicas'
        gradients, so that the same optimizer step keeps them equal. One all-reduce per weight over the group,
        of a buffer with a row per replicated expert only (`Replicas.sum_over_replicas`)."""
        if self.replicas is None:
            raise ValueError("sum_replica_grads needs a layer built with a placement: MoELayer(..., placement=P)")
        for p in self.experts.parameters():
            if p.grad is not None:
                p.grad.copy_(self.replicas.sum_over_replicas(p.grad, self.dispatcher.group))

    @torch.no_grad()
    def set_placement(self, placement: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Lesson 11: move to a new placement between steps, as a deployment does when the load shifts. Every
        slot gets its new expert's weights (and, given the optimizer, that expert's optimizer state), taken from
        the expert's first replica under the old placement. Every rank of the group calls it together."""
        if self.replicas is None:
            raise ValueError("set_placement needs a layer built with a placement: MoELayer(..., placement=P)")
        check_same_on_every_rank(placement, self.dispatcher.group)
        new = Replicas(placement, self.cfg.num_experts, *rank_and_size(self.dispatcher.group))
        if new.mine.shape != self.replicas.mine.shape:
            raise ValueError(f"a new placement keeps {len(self.replicas.mine)} slots per rank, got {len(new.mine)}")
        for p in self.experts.parameters():
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for t in [p.data] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]:
                t.copy_(self.replicas.logical(t, self.dispatcher.group, first_only=True)[new.mine.to(t.device)])
        self.replicas = new

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the unsharded weights (`lessons_lib.moe.init.init_full_state_dict` names and shapes),
        keeping only this rank's part: its experts (EP), or its slice of every expert (TP)."""
        expected = {f"router.{name}": p for name, p in self.router.named_parameters()}  # the hash router has none
        if self.cfg.router == "table":  # lesson 06: the table is part of the weights, the same on every rank
            expected["router.tid2eid"] = self.router.tid2eid
        if self.shared is not None:  # lesson 08: every rank holds the whole shared expert
            expected |= {f"shared.{name}": p for name, p in self.shared.named_parameters()}
        for name, p in self.experts.named_parameters():
            expected[f"experts.{name}"] = p
        missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
        if missing or unexpected:
            raise ValueError(f"state dict keys differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        E = self.cfg.num_experts
        full_shapes = {f"experts.{n}": (E, *shape) for n, shape in expert_weight_shapes(self.cfg).items()}
        for name, p in expected.items():
            full = sd[name]
            want = full_shapes.get(name, tuple(p.shape))
            if tuple(full.shape) != want:
                raise ValueError(f"{name} must have shape {list(want)}, got {list(full.shape)}")
            if name == "router.tid2eid":  # lesson 06: every id's k experts must exist and differ
                self.router.check_table(full)
            if name.startswith("experts."):
                if self.replicas is not None:  # lesson 11: every slot holds its logical expert's weights
                    full = full[self.replicas.slot_expert.to(full.device)]
                mine = self.experts.experts
                full = self.experts.shard(name.removeprefix("experts."), full[mine.start : mine.stop])
            p.copy_(full)
