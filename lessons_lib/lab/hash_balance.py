"""How balanced routing by token id is, on uniform and on Zipf-distributed token streams (lesson 06).

A token stream is a sequence of token ids; each id has a fixed embedding (a random [V, H] table), which is what a
learned router sees. Three routers route the same stream and we report the busiest expert's load over the mean:
- "hash": Roller et al.'s random hash of the token id (`HashRouter`);
- "balanced table": a table by token id (`TableRouter`, DeepSeek-V4's shape) built offline by `balanced_table`
  from the counts of a separate sample of the same stream, as Roller et al.'s balanced hash is built from the
  training data;
- "sigmoid_bias": DeepSeek-V3's learned router, its bias updated step by step on the stream (`update_expert_bias`),
  so it adapts to whatever the stream's frequencies are.
Uniform ids balance the random hash by construction. Text is close to Zipf-distributed (the frequency of the r-th
most common token ∝ 1/r^s with s ≈ 1: Piantadosi 2014): every occurrence of a frequent id goes to the same k
experts, and nothing moves the random hash's choice; a table built from the counts spreads the frequent ids over
the experts instead.
"""
from __future__ import annotations

import torch

from ..moe.config import MoEConfig
from ..moe.hash_router import balanced_table
from ..moe.layer import MoELayer
from ..moe.load_balancing import update_expert_bias

ROUTERS = ("hash", "balanced table", "sigmoid_bias")


def token_stream(num_tokens: int, vocab: int, zipf_s: float | None, generator: torch.Generator) -> torch.Tensor:
    """[num_tokens] ids in 0..vocab-1: uniform (zipf_s None) or P(id r) ∝ 1/(r+1)^s."""
    if zipf_s is None:
        return torch.randint(vocab, (num_tokens,), generator=generator)
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** zipf_s
    return torch.multinomial(p / p.sum(), num_tokens, replacement=True, generator=generator)


def _layer(cfg: MoEConfig, name: str, vocab: int, zipf_s: float | None, count_tokens: int, seed: int) -> MoELayer:
    plain = {**cfg.__dict__, "routed_scaling_factor": 1.0, "num_groups": 1, "topk_groups": None, "vocab_size": None}
    if name == "hash":
        return MoELayer(MoEConfig(**{**plain, "router": "hash"}))
    if name == "sigmoid_bias":  # the config's own groups and scale, if it is DeepSeek-V3's router
        mine = cfg.__dict__ if cfg.router == "sigmoid_bias" else plain
        return MoELayer(MoEConfig(**{**mine, "router": "sigmoid_bias", "vocab_size": None}))
    layer = MoELayer(MoEConfig(**{**plain, "router": "table", "vocab_size": vocab}))
    sample = token_stream(count_tokens, vocab, zipf_s, torch.Generator().manual_seed(seed + 2))  # offline
    layer.router.tid2eid.copy_(balanced_table(torch.bincount(sample, minlength=vocab), cfg.num_experts, cfg.top_k))
    return layer


def expert_load_balance(cfg: MoEConfig, vocab: int = 32_000, zipf_s: float | None = 1.0, tokens: int = 4096,
                        steps: int = 50, bias_rate: float = 1e-3, count_tokens: int = 1_000_000,
                        seed: int = 0) -> dict[str, float]:
    """{router: max/mean expert load} over the last step's `tokens` tokens, after `steps` steps of `tokens`
    tokens each (the bias router updates its bias after each; the others do not learn). The balanced table is
    built from the counts of `count_tokens` other tokens of the same stream."""
    if steps <= 0 or tokens <= 0 or vocab <= 0 or count_tokens <= 0:
        raise ValueError("expert_load_balance needs steps, tokens, vocab and count_tokens > 0")
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, cfg.hidden_dim, generator=g)
    out = {}
    for name in ROUTERS:
        layer = _layer(cfg, name, vocab, zipf_s, count_tokens, seed)
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
