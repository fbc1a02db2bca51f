"""The companion library of the MoE expert-parallelism course.

Three kinds of module, one folder each; every module names the lesson that defines it:
    lessons_lib.moe     the layer's parts: config, router, dispatchers, expert banks, the layer itself
    lessons_lib.lab     measurement: timing, the machine's limits, traffic, equivalence proofs, benchmarks, figures
    lessons_lib.course  course tools: the toy task and its trainer, the exercises and their checker
The layer's parts import nothing from the other two.
"""
from .moe import (
    DISPATCHERS,
    EXPERT_BANKS,
    ROUTERS,
    Dispatcher,
    DispatchState,
    MoEAux,
    MoEConfig,
    MoELayer,
    Routing,
    TopKRouter,
    experts_of_rank,
    init_full_state_dict,
    load_balancing_loss,
    rank_and_size,
)

__all__ = [
    "DISPATCHERS", "EXPERT_BANKS", "ROUTERS", "Dispatcher", "DispatchState", "MoEAux", "MoEConfig", "MoELayer",
    "Routing", "TopKRouter", "experts_of_rank", "init_full_state_dict", "load_balancing_loss", "rank_and_size",
]
