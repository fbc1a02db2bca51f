"""The companion library of the MoE expert-parallelism course.

Each module is one idea of one lesson; its docstring says which.
"""
from .config import MoEConfig
from .distributed import experts_of_rank, rank_and_size
from .init import init_full_state_dict
from .layer import DISPATCHERS, EXPERT_BANKS, ROUTERS, MoEAux, MoELayer
from .router import Routing, TopKRouter, load_balancing_loss

__all__ = [
    "DISPATCHERS", "EXPERT_BANKS", "ROUTERS", "MoEAux", "MoEConfig", "MoELayer", "Routing", "TopKRouter",
    "experts_of_rank", "init_full_state_dict", "load_balancing_loss", "rank_and_size",
]
