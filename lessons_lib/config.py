"""The configuration of one MoE layer (defined in lesson 01).

Every layer variant of the course is built from the same `MoEConfig`, so a lesson
can swap the dispatcher or the expert bank and keep everything else fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = ("gelu", "swiglu")
ROUTERS = ("softmax_topk",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {sorted(allowed)}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """Sizes and choices of one MoE layer.

    num_experts: E, the number of expert FFNs.
    top_k: k, how many experts each token is sent to (1..E).
    hidden_dim: H, the model width (input and output of the layer).
    ffn_dim: F, the inner width of one expert.
    activation: "gelu" (y = gelu(x·w1)·w2) or "swiglu" (y = (silu(x·w1) ⊙ x·w3)·w2).
    router: which router scores the tokens ("softmax_topk": Mixtral/Qwen-MoE style).
    norm_topk_prob: renormalize the k chosen probabilities to sum to 1 (Mixtral: True;
        Qwen-MoE leaves them unnormalized when its `norm_topk_prob` is False).
    dtype: parameter dtype, "float32", "bfloat16" or "float16" (the router always scores in fp32).
    seed: the seed the weights are drawn from; the same seed gives the same layer
        on any number of ranks (see `lessons_lib.init`).
    """

    num_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 64
    ffn_dim: int = 256
    activation: str = "gelu"
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden_dim", "ffn_dim"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in 1..num_experts (1..{self.num_experts}), got {self.top_k}"
            )
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("router", self.router, ROUTERS)
        if isinstance(self.dtype, torch.dtype):  # accept torch.bfloat16 as well as "bfloat16"
            names = {v: k for k, v in DTYPES.items()}
            object.__setattr__(self, "dtype", names.get(self.dtype, self.dtype))
        _one_of("dtype", self.dtype, DTYPES)
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"MoEConfig.norm_topk_prob must be True or False, got {self.norm_topk_prob!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"MoEConfig.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
