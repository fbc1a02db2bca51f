"""What replicas buy and cost (lesson 11): the busiest rank's rows and step time before and after a placement, and
the memory one replica takes.

`skewed_layer_loads` steers a share of every rank's tokens to chosen experts (as lesson 06 steers them to one
rank) and reads the per-expert load the router really produced. `step_time_with_placements` then runs the same
layer with each placement and reports, per placement, the rows each rank's experts really received (the
dispatcher's split sizes), the time each rank's experts take on them alone, and the forward and training step
of the whole group, the slowest rank's time.

Where it can be measured: the step waits for the busiest rank only if every rank computes at once. With more
ranks than cores they take turns on the cores, and the step follows the total work, which a placement does not
change; so each rank runs pinned to a core of its own (`timing.own_core`), and the lesson measures on as many
ranks as there are cores (2 on the course's CPU machine).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.init import expert_weight_shapes, init_full_state_dict
from ..moe.layer import MoELayer
from ..moe.placement import Replicas
from .timing import median, own_core, timed_runs, train_step_times

HOT = 30.0  # the logit the steered tokens give the hot experts: decides their choices outright


def _steered_inputs(cfg: MoEConfig, tokens: int, hot_share: float, rank: int) -> torch.Tensor:
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(1000 + rank))
    x[:, 0] = 0.0
    x[: round(tokens * hot_share), 0] = 1.0  # feature 0 marks the steered tokens
    return x


def _hot(hot_experts) -> list[int]:
    return [hot_experts] if isinstance(hot_experts, int) else list(hot_experts)


def _steer(layer: MoELayer, hot_experts) -> None:
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[_hot(hot_experts), 0] = HOT


def skewed_layer_loads(cfg: MoEConfig, tokens: int, hot_share: float, hot_experts=0, group=None,
                       device=None) -> torch.Tensor:
    """[E] (token, slot) pairs per expert over all ranks when hot_share of every rank's tokens pick hot_experts
    (an id or a list of up to top_k ids) first (the rest route freely). Every rank of `group` calls it together."""
    rank, _ = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    layer = MoELayer(cfg).to(device)
    layer.load_full_state_dict(init_full_state_dict(cfg))
    _steer(layer, hot_experts)
    with torch.no_grad():
        routing = layer.route(_steered_inputs(cfg, tokens, hot_share, rank).to(device, cfg.torch_dtype))
    load = routing.tokens_per_expert(cfg.num_experts)
    dist.all_reduce(load, group=group)
    return load


def _gather_floats(values: list[float], group, device) -> list[list[float]]:
    """Every rank's list (of the same length), rank by rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [t.tolist() for t in every]


def step_time_with_placements(cfg: MoEConfig, tokens: int, hot_share: float, placements: dict, hot_experts=0,
                              experts: str = "loop", rounds: int = 3, steps: int = 5, train_steps: int = 3,
                              warmup: int = 2, group=None, device=None) -> dict:
    """{name: {"rows_per_rank": [N] rows each rank's experts received, "busiest_over_mean",
    "experts_ms_per_rank": [N] the time of each rank's experts alone on those rows (the median over the rounds of
    each round's median), "forward_ms": [rounds]
    the median forward of each round (as when serving), "step_ms": [rounds] the median training step (AdamW, replica
    gradients summed each step)}} for each placement (None: no placement, lesson 03's contiguous experts), on the
    steered tokens of `skewed_layer_loads`, each rank pinned to a core of its own where the machine has one per
    rank. The placements take turns round by round, so that a machine that slows down slows them alike; the spread
    over the rounds is the measurement's. Every rank of `group` calls it together."""
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    sd = init_full_state_dict(cfg)
    x = _steered_inputs(cfg, tokens, hot_share, rank).to(device, cfg.torch_dtype)
    layers, out = {}, {}
    with own_core():
        for name, placement in placements.items():
            layer = MoELayer(cfg, "alltoall", experts, group=group, placement=placement).to(device)
            layer.load_full_state_dict(sd)
            _steer(layer, hot_experts)
            with torch.no_grad():
                dispatched = layer.dispatch(x, layer.route(x))
            layers[name] = (layer, {k: v.clone() for k, v in layer.state_dict().items()}, dispatched)
            rows = [int(r) for r, _ in _gather_floats([float(sum(dispatched[2].out_splits)), 0.0], group, device)]
            out[name] = {"rows_per_rank": rows, "busiest_over_mean": max(rows) * N / sum(rows),
                         "experts_ms_per_rank": [], "forward_ms": [], "step_ms": []}
        alone = {name: [] for name in layers}
        for _ in range(rounds):
            for name, (layer, weights, dispatched) in layers.items():
                with torch.no_grad():  # this rank's experts alone: no collective, each rank times its own work
                    alone[name].append(median(timed_runs(lambda: layer.run_experts(*dispatched), steps, warmup,
                                                         device, collective=False)))

                def forward():
                    with torch.no_grad():
                        layer(x)
                out[name]["forward_ms"].append(median(timed_runs(forward, steps, warmup, device, group)))
                # with replicas, a training step also sums the replicas' gradients, as training must
                sync = layer.sum_replica_grads if layer.replicas is not None else None
                out[name]["step_ms"].append(median(train_step_times(layer, tokens, train_steps, warmup, group, x=x,
                                                                    after_backward=sync)))
                layer.load_state_dict(weights)  # the steps trained the router: put back the routing measured above
    for name in layers:  # the median over the rounds of each rank's experts alone
        out[name]["experts_ms_per_rank"] = [t for t, in _gather_floats([median(alone[name])], group, device)]
    return out


def grad_sum_times(cfg: MoEConfig, placement: torch.Tensor, steps: int = 10, warmup: int = 3, group=None,
                   device=None) -> dict:
    """The two ways to sum the replicas' gradients (lesson 11), timed on one expert weight's gradient of each of
    this rank's slots: {"replicated rows only": ..., "every expert": ...}, each {"rows", "bytes", "ms"}, where
    rows are those of the all-reduced buffer, bytes its size per rank and ms the median of the slowest rank. The
    first is what `MoELayer.sum_replica_grads` does (`Replicas.sum_over_replicas`); the second all-reduces an
    [E, ...] buffer with every expert's gradient (`Replicas.logical`) and reads this rank's slots from it. Every
    rank of `group` calls it together."""
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    replicas = Replicas(placement, cfg.num_experts, rank, N)
    shape = expert_weight_shapes(cfg)["w2"]  # one matrix of an expert
    grad = torch.randn(len(replicas.mine), *shape, device=device, dtype=cfg.torch_dtype,
                       generator=torch.Generator(device).manual_seed(rank))
    mine = replicas.mine.to(device)
    ways = {"replicated rows only": (len(replicas.replicated), lambda: replicas.sum_over_replicas(grad, group)),
            "every expert": (cfg.num_experts, lambda: replicas.logical(grad, group)[mine])}
    # the same sums (the two all-reduces may add the ranks' parts in another order)
    torch.testing.assert_close(ways["replicated rows only"][1](), ways["every expert"][1]())
    row_bytes = grad[0].numel() * grad.element_size()
    return {name: {"rows": rows, "bytes": rows * row_bytes, "ms": median(timed_runs(fn, steps, warmup, device, group))}
            for name, (rows, fn) in ways.items()}


def replica_memory_bytes(cfg: MoEConfig) -> dict[str, float]:
    """Bytes one replica of one expert of cfg costs: {"parameters", "serving, FP8 weights", "training"} where
    training holds bf16 weights, an fp32 master copy, fp32 gradients and AdamW's two fp32 moments (2 + 4 + 4 + 8
    bytes per parameter, a common mixed-precision setup)."""
    params = sum(int(torch.Size(shape).numel()) for shape in expert_weight_shapes(cfg).values())
    return {"parameters": params, "serving, FP8 weights": params * 1.0, "serving, bf16 weights": params * 2.0,
            "training": params * 18.0}
