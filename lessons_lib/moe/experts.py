"""The expert bank: E independent FFNs with weights stacked per expert (lesson 01).

`LoopExperts` is the plain version: one small GEMM chain per expert, in a Python
loop. Lesson 04 adds banks that batch the experts; all of them read these same
stacked weights, so any dispatcher can use any bank.

Shapes as in `dispatcher`: L experts held here, M rows grouped by local expert, H hidden, F inner size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .fused import SwiGLU
from .init import init_expert_weights


def activate(h1: torch.Tensor, h3: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The nonlinearity between the two matmuls: gelu(h1), or silu(h1) ⊙ h3 for swiglu (one pass each way on a
    GPU: `fused.SwiGLU`, lesson 04)."""
    if activation == "swiglu":
        return SwiGLU.apply(h1, h3)
    return F.gelu(h1)


class ExpertBank(nn.Module):
    """The weights of the experts this rank owns, stacked: w1 [e, H, F], w2 [e, F, H],
    and w3 [e, H, F] for swiglu. No biases. `experts` is the range of global expert
    ids held here (all of them on a single device). `ffn_slice` keeps only part of each
    expert's inner dimension F: the columns of w1/w3 and rows of w2 of a tensor-parallel
    rank (lesson 07); None keeps all of F.

    forward(x_MH, counts_L, sizes=None): x_MH holds the rows sent to these experts, grouped by
    expert in order (counts_L[i] rows for local expert i); returns [M, H] in the same order.
    sizes: the same counts as Python ints, where the dispatcher already has them on the host
    (lesson 03's all-to-all does): a bank that must slice by count then needs no host sync.
    `path` says how the last forward ran (the batched banks of lesson 04 choose).
    """

    path = "a loop over experts, one GEMM chain each"
    same_function_as_loop = True  # False for a bank that rounds differently on purpose (lesson 11's FP8 bank)

    def __init__(self, cfg: MoEConfig, experts: range, ffn_slice: slice | None = None):
        super().__init__()
        self.cfg = cfg
        self.experts = experts
        self.ffn_slice = ffn_slice if ffn_slice is not None else slice(0, cfg.ffn_dim)
        for name, w in init_expert_weights(cfg, experts).items():
            self.register_parameter(name, nn.Parameter(self.shard(name, w)))

    def shard(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """This bank's part of `weights`, the full stacked weight `name` of its experts."""
        s = self.ffn_slice
        return (weights[:, s, :] if name == "w2" else weights[:, :, s]).contiguous()

    def extra_repr(self) -> str:
        e, c, s = self.experts, self.cfg, self.ffn_slice
        f = f"F={c.ffn_dim}" if s == slice(0, c.ffn_dim) else f"F columns {s.start}..{s.stop - 1} of {c.ffn_dim}"
        return f"experts {e.start}..{e.stop - 1} ({len(e)} here), {c.activation}, H={c.hidden_dim}, {f}"

    @property
    def num_local_experts(self) -> int:
        return len(self.experts)

    def forward(self, x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        raise NotImplementedError


class LoopExperts(ExpertBank):
    """One expert at a time: split the grouped rows by count, run each expert's FFN."""

    def forward(self, x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        # unbind, not w1[e]: the backward of indexing would build a zero [L, H, F] gradient
        # per expert; unbind's backward stacks the L per-expert gradients once.
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        w3 = self.w3.unbind(0) if self.cfg.activation == "swiglu" else None
        outs = []
        # tolist() is the one host sync: Python needs the sizes to slice (unless the dispatcher gave them).
        for e, x_e in enumerate(x_MH.split(counts_L.tolist() if sizes is None else sizes)):
            h3 = x_e @ w3[e] if w3 is not None else None
            outs.append(activate(x_e @ w1[e], h3, self.cfg.activation) @ w2[e])
        return torch.cat(outs) if outs else x_MH.new_zeros(0, self.cfg.hidden_dim)
