"""A Triton kernel that quantizes whole rows to FP8 in one pass, optionally applying the activation first (lesson 13).

The FP8 bank quantizes the rows of each GEMM with one scale per row. `fp8.quantize_fp8` does it in plain ops, and
torch.compile fuses those into one kernel; but for a row of 7168 channels the compiled kernel loops over the row
twice, once to find its largest magnitude and once to divide, so it reads the rows twice. A row fits in the
registers of one program: read it once, find its amax, write the e4m3 values and the scale. With an activation,
the program reads h1 (and h3 for SwiGLU) instead, so the second GEMM's FP8 rows are written without the
activation ever going to memory in bf16.

It computes what the plain ops compute: the activation rounded to bf16 as the eager ops round it, the same
power-of-two scale (found from the bits of amax / 448, which is exact), the same round-to-nearest into e4m3.
Used for bf16 rows on a GPU where Triton is installed; elsewhere the bank uses the plain ops. Lesson 13's record
compares the two on an H200.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

ACTIVATIONS = {None: 0, "swiglu": 1, "gelu": 2}


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can quantize x: bf16 rows on a GPU, with Triton installed."""
    return triton is not None and x.is_cuda and x.dtype == torch.bfloat16


if triton is not None:
    @triton.jit
    def _rows_to_fp8(a_ptr, b_ptr, q_ptr, scale_ptr, width, stride, ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        a = tl.load(a_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:  # silu(h1) * h3, each op's result rounded to bf16 as the eager ops round it
            b = tl.load(b_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            silu = (a / (1.0 + tl.exp(-a))).to(tl.bfloat16).to(tl.float32)
            a = (silu * b).to(tl.bfloat16).to(tl.float32)
        elif ACT == 2:  # gelu, the exact (erf) form
            a = (0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))).to(tl.bfloat16).to(tl.float32)
        ratio = tl.max(tl.abs(a), axis=0) / 448.0
        # the smallest 2^n >= ratio, from its bits: the exponent, plus one unless the mantissa is zero (for any
        # amax above 448 · 2^-126, i.e. not a subnormal ratio, this is ceil(log2(ratio)) exactly)
        bits = ratio.to(tl.int32, bitcast=True)
        n = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = tl.where(ratio > 0, (n << 23).to(tl.float32, bitcast=True), 1.0)
        q = tl.clamp(a / scale, -448.0, 448.0)
        tl.store(q_ptr + row * width + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)


def rows_to_fp8(a_MW: torch.Tensor, b_MW: torch.Tensor | None = None, activation: str | None = None):
    """(q [M, W] e4m3, scales [M] fp32) of the rows a_MW, or of activation(a_MW, b_MW). The rows may be a
    column slice of a wider tensor (h[:, :F] and h[:, F:] of the bank's fused first GEMM): each row's W values
    must be contiguous, and b_MW must have a_MW's row stride."""
    M, W = a_MW.shape
    if a_MW.stride(1) != 1 or (b_MW is not None and b_MW.stride() != a_MW.stride()):
        raise ValueError("rows_to_fp8 needs rows whose values are contiguous, a and b with the same strides")
    q = torch.empty(M, W, device=a_MW.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(M, device=a_MW.device, dtype=torch.float32)
    block = triton.next_power_of_2(W)
    _rows_to_fp8[(M,)](a_MW, a_MW if b_MW is None else b_MW, q, scale, W, a_MW.stride(0),
                       ACT=ACTIVATIONS[activation], BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return q, scale
