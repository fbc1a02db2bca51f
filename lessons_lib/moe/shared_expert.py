"""The shared expert: a dense FFN that every token passes, beside the routed experts (lesson 08).

    y = shared(x) + Σ_{e in top-k(x)} weight_e(x) · expert_e(x)          (DeepSeekMoE, DeepSeek-V2/V3)
    y = sigmoid(x·g) · shared(x) + Σ ...                                   (Qwen2-MoE's gated shared expert)

It holds what every token needs, so the routed experts can specialise. It needs no dispatch: under expert
parallelism each rank keeps a whole copy and runs it on its own tokens, so its gradients, like the router's,
come from this rank's tokens only and are summed over the group (`MoELayer.replicated_parameters`).
Because it needs no communication it can run while the dispatch's rows travel (`overlap.SharedBeside`).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import activate
from .init import first_weight_name, init_shared_weights


class SharedExpert(nn.Module):
    """x_TH -> [T, H]: act(x·w1)·w2 (swiglu: act(x·w13)·w2, w13 = w1 and w3 side by side, as an expert's), times
    sigmoid(x·gateᵀ) when cfg.shared_gate."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        for name, w in init_shared_weights(cfg).items():
            self.register_parameter(name, nn.Parameter(w))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.activation}, H={c.hidden_dim}, S={c.shared_ffn_dim}{', gated' if c.shared_gate else ''}"

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        y_TH = activate(x_TH @ getattr(self, first_weight_name(c)), c.activation) @ self.w2
        if c.shared_gate:
            y_TH = torch.sigmoid(x_TH @ self.gate.t()) * y_TH
        return y_TH
