"""The MoE block a user would pick instead of the course's layer, timed at the same shape and weights (lesson 04).

transformers' `Qwen3MoeSparseMoeBlock` is the same function as the course's layer with the softmax top-k router,
k weights renormalized and SwiGLU experts: a router `nn.Linear`, then the experts, here with its grouped GEMM
implementation (`experts_implementation="grouped_mm"`, the fastest it has for training). `qwen3_moe_block` loads
our weights into it, so the two compute the same outputs (tests/test_bench.py checks it), and `peer_ms` times it
the way `bench.bench_one` times ours. The bench runs without transformers: the peer is then left out.
"""
from __future__ import annotations

import torch

from ..moe.config import MoEConfig
from .timing import median, timed_runs

PEER = "transformers Qwen3MoeSparseMoeBlock, grouped_mm experts"


def why_no_peer(cfg: MoEConfig) -> str | None:
    """Why transformers' block cannot compute this layer's function (None: it can)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    if cfg.router != "softmax_topk" or cfg.activation != "swiglu" or cfg.shared_ffn_dim or not cfg.norm_topk_prob:
        return "the peer is the softmax top-k router with renormalized weights and SwiGLU experts, no shared expert"
    if cfg.capacity_factor is not None or cfg.dispatch_dtype is not None:
        return "the peer has no capacity and no FP8 dispatch"
    return None


@torch.no_grad()
def qwen3_moe_block(cfg: MoEConfig, sd: dict[str, torch.Tensor], device, implementation: str = "grouped_mm"):
    """transformers' Qwen3-MoE block holding the weights `sd` (`moe.init.init_full_state_dict` names), in the layer's
    dtype on `device`. Ours: w13 [E, H, 2F] (the gate's F columns, then the up projection's), w2 [E, F, H] (x @ w);
    theirs: gate_up_proj [E, 2F, H] in the same order and down_proj [E, H, F] (x @ wᵀ)."""
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = transformers.Qwen3MoeConfig(hidden_size=cfg.hidden_dim, moe_intermediate_size=cfg.ffn_dim,
                                     num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=True,
                                     experts_implementation=implementation)
    block = Qwen3MoeSparseMoeBlock(hf).to(device, cfg.torch_dtype)
    block.gate.weight.copy_(sd["router.weight"])
    block.experts.gate_up_proj.copy_(sd["experts.w13"].transpose(1, 2))
    block.experts.down_proj.copy_(sd["experts.w2"].transpose(1, 2))
    return block


def peer_ms(cfg: MoEConfig, sd: dict[str, torch.Tensor], tokens: int, device, steps: int, warmup: int) -> dict:
    """Forward + backward (input gradient included, fresh weight gradients) of the peer on `tokens` random tokens,
    median ms, as `bench.bench_one` times our layer: {"name", "transformers", "fwd_bwd_ms"}, or {"skipped": why}."""
    why = why_no_peer(cfg)
    if why is not None:
        return {"name": PEER, "skipped": why}
    import transformers

    block = qwen3_moe_block(cfg, sd, device)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype).requires_grad_()
    grad = torch.randn(1, tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    ms = median(timed_runs(fwd_bwd, steps, warmup, device, collective=False))
    return {"name": PEER, "transformers": transformers.__version__, "fwd_bwd_ms": ms}
