"""The MoE layer's parts (lessons 01 to 07): `MoELayer` composes a router, a dispatcher and an expert bank.

    config.py            MoEConfig, the sizes and choices of one layer                      lesson 01
    init.py              deterministic weights, the same slice on any number of ranks      lesson 01
    router.py            Routing, the softmax top-k router, the auxiliary loss              lesson 01
    dispatcher.py        what a dispatcher provides (the contract and its shape legend)     lessons 01-03
    dispatch_local.py    every expert on this device; the rows every dispatcher starts from lesson 01
    experts.py           the expert bank: stacked weights, one expert after the other       lesson 01
    layer.py             MoELayer: route -> dispatch -> run_experts -> combine              lesson 01
    distributed.py       ranks and who owns which experts                                   lesson 00
    traffic.py           the bytes a dispatcher moved                                       lesson 02
    dispatch_allgather.py  expert parallelism by padded all_gather                          lesson 02
    dispatch_alltoall.py   expert parallelism by all_to_all_single                          lesson 03
    experts_batched.py   padded bmm and grouped GEMM banks                                  lesson 04
    capacity.py          expert capacity, dropping, static shapes                           lesson 05
    cuda_graph.py        one CUDA graph per training step                                   lesson 05
    load_balancing.py    DeepSeek-V3's router, z-loss, the balancing bias                   lesson 06
    tensor_parallel.py   the TP split of every expert, for comparison                       lesson 07
    process_groups.py    EP x DP process groups                                             lesson 07
"""
from .config import MoEConfig
from .dispatcher import Dispatcher, DispatchState
from .distributed import experts_of_rank, rank_and_size
from .init import init_full_state_dict
from .layer import DISPATCHERS, EXPERT_BANKS, ROUTERS, MoEAux, MoELayer
from .router import Routing, TopKRouter, load_balancing_loss

__all__ = [
    "DISPATCHERS", "EXPERT_BANKS", "ROUTERS", "Dispatcher", "DispatchState", "MoEAux", "MoEConfig", "MoELayer",
    "Routing", "TopKRouter", "experts_of_rank", "init_full_state_dict", "load_balancing_loss", "rank_and_size",
]
