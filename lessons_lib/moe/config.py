"""The configuration of one MoE layer (defined in lesson 01).

Every layer variant of the course is built from the same `MoEConfig`, so a lesson
can swap the dispatcher or the expert bank and keep everything else fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACTIVATIONS = ("gelu", "swiglu")
ROUTERS = ("softmax_topk", "sigmoid_bias", "hash", "table")
ROUTES_BY_ID = ("hash", "table")  # the routers that choose experts by token id: the layer needs `token_ids`
DROP_POLICIES = ("probs", "position")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISPATCH_DTYPES = ("float8_e4m3fn",)
FP8_TILE = 128  # channels per scale of an FP8 dispatch row (lesson 12)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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
    activation: "gelu" (y = gelu(x·w1)·w2) or "swiglu" (y = (silu(x·w1) ⊙ x·w3)·w2, w1 and w3 stored side by side
        as w13).
    router: which router scores the tokens: "softmax_topk" (Mixtral/Qwen-MoE, lesson 01) or
        "sigmoid_bias" (DeepSeek-V3: sigmoid scores, a balancing bias used only to choose, lesson 06) or
        "hash" (Roller et al.'s hash layers: k experts from a fixed hash of the token id, weight 1/k each, no
        router weight and no aux loss) or "table" (DeepSeek-V4's first layers: the k experts looked up in a stored
        table [vocab_size, k] by token id, weighted by the gate's sqrt(softplus(x·W)) scores, normalized, times
        routed_scaling_factor); both need `token_ids` (lesson 06).
    norm_topk_prob: renormalize the k chosen probabilities to sum to 1 (Mixtral: True;
        Qwen-MoE leaves them unnormalized when its `norm_topk_prob` is False).
    routed_scaling_factor: "sigmoid_bias" and "table": the chosen weights are multiplied by it
        (DeepSeek-V3 uses 2.5, DeepSeek-V4 1.5).
    vocab_size: "table" only: the rows of its table, one per token id.
    num_groups, topk_groups: "sigmoid_bias" only: group-limited selection. The experts form
        num_groups equal groups; a token may only choose experts from its topk_groups best
        groups (a group's score: the sum of its 2 best scores s + b). None keeps every group.
    capacity_factor: lesson 05. None: dropless. Otherwise each expert takes at most
        C = ceil(k·T/E · capacity_factor) (token, slot) pairs from the T tokens of one rank;
        the rest are dropped and add nothing.
    drop_policy: which pairs an expert keeps when it is over capacity: "probs" (highest routing
        weight first) or "position" (first in token order).
    pad_to_capacity: pad every expert's rows to exactly C, so every shape is fixed (and, when every
        rank has the same T, every all-to-all split size), at the cost of computing and sending the
        padding. The course's alltoall dispatcher still exchanges counts and syncs once per step.
    shared_ffn_dim: lesson 08. S, the inner width of a shared expert: a dense FFN (the layer's activation) that
        every token passes, added to the routed output, never dispatched (DeepSeek-V3: S = n_shared · F). None: none.
    shared_gate: multiply the shared expert's output by sigmoid(x·g), g [1, H] (Qwen2-MoE).
    dispatch_dtype: lesson 12. None: dispatched rows travel in the layer's dtype. "float8_e4m3fn": each row is
        quantized to FP8 with one scale per 128 channels (H must be a multiple of 128) for the dispatch, and
        dequantized where it arrives; the combine stays in the layer's dtype (DeepSeek-V3's choice).
    dtype: parameter dtype, "float32", "bfloat16" or "float16" (the router always scores in fp32).
    seed: the seed the weights are drawn from; the same seed gives the same layer
        on any number of ranks (see `lessons_lib.moe.init`).
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
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int | None = None
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    pad_to_capacity: bool = False
    shared_ffn_dim: int | None = None
    shared_gate: bool = False
    dispatch_dtype: str | None = None
    vocab_size: int | None = None

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
        self._check_routing_options()
        self._check_capacity()
        self._check_shared()
        if self.dispatch_dtype is not None:
            _one_of("dispatch_dtype", self.dispatch_dtype, DISPATCH_DTYPES)
            if self.hidden_dim % FP8_TILE:
                raise ValueError(f"MoEConfig.dispatch_dtype={self.dispatch_dtype!r} has one scale per {FP8_TILE} "
                                 f"channels: hidden_dim must be a multiple of {FP8_TILE}, got {self.hidden_dim}")

    def _check_routing_options(self):
        if not _positive_number(self.routed_scaling_factor):
            raise ValueError(f"MoEConfig.routed_scaling_factor must be a number > 0, "
                             f"got {self.routed_scaling_factor!r}")
        _positive_int("num_groups", self.num_groups)
        if self.num_experts % self.num_groups:
            raise ValueError(f"MoEConfig.num_groups ({self.num_groups}) must divide num_experts "
                             f"({self.num_experts}) so that every group has the same number of experts")
        if self.topk_groups is not None:
            _positive_int("topk_groups", self.topk_groups)
            if self.topk_groups > self.num_groups:
                raise ValueError(f"MoEConfig.topk_groups must be in 1..num_groups (1..{self.num_groups}), "
                                 f"got {self.topk_groups}")
            allowed = self.topk_groups * (self.num_experts // self.num_groups)
            if self.top_k > allowed:
                raise ValueError(f"MoEConfig.topk_groups={self.topk_groups} leaves {allowed} experts to choose "
                                 f"from, fewer than top_k={self.top_k}")
        grouped = self.num_groups > 1 or self.topk_groups is not None
        if self.router != "sigmoid_bias" and grouped:
            raise ValueError(f"MoEConfig.num_groups and topk_groups belong to router='sigmoid_bias'; the "
                             f"{self.router} router has none of them")
        if self.router not in ("sigmoid_bias", "table") and self.routed_scaling_factor != 1.0:
            raise ValueError(f"MoEConfig.routed_scaling_factor belongs to router='sigmoid_bias' or 'table'; the "
                             f"{self.router} router has none")
        if (self.router == "table") != (self.vocab_size is not None):
            raise ValueError("MoEConfig.vocab_size sizes router='table''s table: set it for that router, and only "
                             f"for it (router={self.router!r}, vocab_size={self.vocab_size!r})")
        if self.vocab_size is not None:
            _positive_int("vocab_size", self.vocab_size)

    def _check_shared(self):
        if self.shared_ffn_dim is not None:
            _positive_int("shared_ffn_dim", self.shared_ffn_dim)
        if not isinstance(self.shared_gate, bool):
            raise ValueError(f"MoEConfig.shared_gate must be True or False, got {self.shared_gate!r}")
        if self.shared_gate and self.shared_ffn_dim is None:
            raise ValueError("MoEConfig.shared_gate gates the shared expert: set shared_ffn_dim as well")

    def _check_capacity(self):
        if self.capacity_factor is not None and not _positive_number(self.capacity_factor):
            raise ValueError(f"MoEConfig.capacity_factor must be a number > 0 (or None: dropless), "
                             f"got {self.capacity_factor!r}")
        _one_of("drop_policy", self.drop_policy, DROP_POLICIES)
        if not isinstance(self.pad_to_capacity, bool):
            raise ValueError(f"MoEConfig.pad_to_capacity must be True or False, got {self.pad_to_capacity!r}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("MoEConfig.pad_to_capacity needs a capacity_factor: "
                             "dropless routing has no capacity to pad to")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
