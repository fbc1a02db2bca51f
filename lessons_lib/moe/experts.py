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
from .init import first_weight_name, init_expert_weights


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The nonlinearity between the two matmuls, h [..., F] -> [..., F]: gelu(h); for swiglu h = x·w13 is
    [..., 2F], x·w1 and x·w3 side by side, and the result silu(x·w1) ⊙ x·w3 (one pass each way on a GPU:
    `fused.SwiGLU`, lesson 04)."""
    if activation == "swiglu":
        return SwiGLU.apply(h)
    return F.gelu(h)


class ExpertBank(nn.Module):
    """The weights of the experts this rank owns, stacked: w1 [e, H, F] and w2 [e, F, H]. For swiglu the
    first matrix is w13 [e, H, 2F]: Mixtral's w1 (the gate) and w3 (the up projection) side by side, so one
    GEMM computes both and backward gets the input's gradient from one GEMM instead of two and a sum (as
    transformers' gate_up_proj, Megatron-core's fc1 and SGLang's w13 store them). No biases. `experts` is the
    range of global expert ids held here (all of them on a single device). `ffn_slice` keeps only part of
    each expert's inner dimension F: the columns of w1 (of both halves of w13) and rows of w2 of a
    tensor-parallel rank (lesson 07); None keeps all of F.

    forward(x_MH, counts_L, sizes=None): x_MH holds the rows sent to these experts, grouped by
    expert in order (counts_L[i] rows for local expert i); returns [M, H] in the same order.
    sizes: the same counts as Python ints, where the dispatcher already has them on the host
    (lesson 03's all-to-all does): a bank that must slice by count then needs no host sync.
    `path` says how the last forward ran (the batched banks of lesson 04 choose).
    """

    path = "a loop over experts, one GEMM chain each"
    same_function_as_loop = True  # False for a bank that rounds differently on purpose (lesson 13's FP8 bank)

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
        if name == "w2":
            return weights[:, s, :].contiguous()
        if name == "w13":  # the same columns of the gate half and of the up half
            gate, up = weights.chunk(2, dim=-1)
            return torch.cat([gate[:, :, s], up[:, :, s]], dim=-1)
        return weights[:, :, s].contiguous()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 or w1, w2) as the GEMMs use them: the parameters here; lesson 13's FP4 bank dequantizes."""
        return getattr(self, first_weight_name(self.cfg)), self.w2

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
        w_in, w2 = (w.unbind(0) for w in self.weights())
        outs = []
        # tolist() is the one host sync: Python needs the sizes to slice (unless the dispatcher gave them).
        for e, x_e in enumerate(x_MH.split(counts_L.tolist() if sizes is None else sizes)):
            outs.append(activate(x_e @ w_in[e], self.cfg.activation) @ w2[e])
        return torch.cat(outs) if outs else x_MH.new_zeros(0, self.cfg.hidden_dim)
