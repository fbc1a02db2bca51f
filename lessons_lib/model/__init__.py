"""A model built from the course's MoE layer (lesson 14): `transformer` (the model and its KV cache) and
`generate` (greedy generation, with expert parallelism across ranks that each hold their own sequences)."""
from .generate import generate
from .transformer import KVCache, ModelConfig, MoETransformer

__all__ = ["KVCache", "ModelConfig", "MoETransformer", "generate"]
