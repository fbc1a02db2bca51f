"""The shapes the benchmarks run at (lessons 03 to 05, the benchmark suite).

  small:     the published notebook's setting: 16 experts, top-2, H 256, F 1024, 32 tokens per rank, fp32;
  realistic: DeepSeek-V3-like: 64 experts, top-8, H 7168, expert F 2048, SwiGLU, 4096 tokens per rank, bf16;
  scaling:   the realistic shape at 1k … 16k tokens per rank (time per token should stay flat).
"""
from __future__ import annotations

from ..moe.config import MoEConfig

REALISTIC = MoEConfig(num_experts=64, top_k=8, hidden_dim=7168, ffn_dim=2048, activation="swiglu", dtype="bfloat16")
SHAPES = {  # name: (config, tokens per rank to run)
    "small": (MoEConfig(num_experts=16, top_k=2, hidden_dim=256, ffn_dim=1024), [32]),
    "realistic": (REALISTIC, [4096]),
    "scaling": (REALISTIC, [1024, 2048, 4096, 8192, 16384]),
}
