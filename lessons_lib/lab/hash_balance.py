"""How balanced hash routing is, on uniform and on Zipf-distributed token streams (lesson 06).

A token stream is a sequence of token ids; each id has a fixed embedding (a random [V, H] table), which is what a
learned router sees. Three routers route the same stream and we report the busiest expert's load over the mean:
- "hash": lesson 06's hash of the token id;
- "softmax_topk": lesson 01's router with its random initial weights (no training: what it does before learning);
- "sigmoid_bias": lesson 06's DeepSeek-V3 router, its bias updated step by step on the stream
  (`update_expert_bias`), so it adapts to whatever the stream's frequencies are.
Uniform ids balance the hash by construction. Real text is Zipf-distributed (the frequency of the r-th most common
token ∝ 1/r^s, s ≈ 1): a frequent id sends every one of its occurrences to the same k experts, and no bias can
move it.
"""
from __future__ import annotations

import torch

from ..moe.config import MoEConfig
from ..moe.layer import MoELayer
from ..moe.load_balancing import update_expert_bias

ROUTERS = ("hash", "softmax_topk", "sigmoid_bias")


def token_stream(num_tokens: int, vocab: int, zipf_s: float | None, generator: torch.Generator) -> torch.Tensor:
    """[num_tokens] ids in 0..vocab-1: uniform (zipf_s None) or P(id r) ∝ 1/(r+1)^s."""
    if zipf_s is None:
        return torch.randint(vocab, (num_tokens,), generator=generator)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** zipf_s
    return torch.multinomial(p / p.sum(), num_tokens, replacement=True, generator=generator)


def expert_load_balance(cfg: MoEConfig, vocab: int = 32_000, zipf_s: float | None = 1.0, tokens: int = 4096,
                        steps: int = 50, bias_rate: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """{router: max/mean expert load} over the last step's `tokens` tokens, after `steps` steps of `tokens`
    tokens each (the bias router updates its bias after each; the others do not learn)."""
    if steps <= 0 or tokens <= 0 or vocab <= 0:
        raise ValueError("expert_load_balance needs steps, tokens and vocab > 0")
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, cfg.hidden_dim, generator=g)
    out = {}
    for name in ROUTERS:
        extra = {"routed_scaling_factor": 1.0} if name != "sigmoid_bias" else {}
        layer = MoELayer(MoEConfig(**{**cfg.__dict__, "router": name, **extra}))
        stream = torch.Generator().manual_seed(seed + 1)  # the same stream for every router
        with torch.no_grad():
            for _ in range(steps):
                ids = token_stream(tokens, vocab, zipf_s, stream)
                routing = layer.route(embedding[ids], ids)
                load = routing.tokens_per_expert(cfg.num_experts)
                if name == "sigmoid_bias":
                    update_expert_bias(layer.router, load, bias_rate)
        load = load.float()
        out[name] = (load.max() / load.mean()).item()
    return out
