"""FP4 numbers: MXFP4 weights, e2m1 values with one power-of-two scale per block of 32 (lesson 13).

e2m1 has 2 exponent bits and 1 mantissa bit: the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4 and 6, and a sign. That is too
coarse for activations but workable for weights, whose values are fixed and can be scaled block by block: the OCP
Microscaling (MX) format gives each block of 32 consecutive values one shared scale 2^e (stored as an 8-bit
exponent, E8M0), with e = floor(log2(amax)) - 2, so that the block's largest magnitude lands in [4, 8) and rounds
to at most 6. Two 4-bit codes share a byte: 4 bits a value plus 8 bits per 32 for the scale, 4.25 bits in all,
0.27 of bf16.

Blocks run along the dimension a GEMM sums over (K of a [K, N] weight), as MX GEMM kernels read them. Shapes:
w [..., K, N] with K divisible by 32; codes [..., K, N / 2] uint8 (two values of a row of N per byte, N even);
scales [..., K / 32, N] as int8 exponents.
"""
from __future__ import annotations

import torch

BLOCK = 32
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitude of codes 0..7; code | 8: negative


def _blocks(w: torch.Tensor) -> torch.Tensor:
    *lead, K, N = w.shape
    if K % BLOCK or N % 2:
        raise ValueError(f"MXFP4 blocks of {BLOCK} run along K and two values share a byte along N: K must be a "
                         f"multiple of {BLOCK} and N even, got K={K}, N={N}")
    return w.reshape(*lead, K // BLOCK, BLOCK, N)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K, N] -> (codes [..., K, N/2] uint8, exponents [..., K/32, N] int8): w ≈ E2M1[code] · 2^exponent."""
    blocks = _blocks(w.float())
    amax = blocks.abs().amax(-2, keepdim=True)  # [..., K/32, 1, N]
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax)).clamp(-127, 127)
    scaled = (blocks / torch.exp2(exponent)).clamp(-6.0, 6.0)
    # the nearest e2m1 magnitude (ties to the lower one, a fixed rule both the bank and its tests use)
    grid = E2M1.to(w.device)
    magnitude = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1)
    code = (magnitude | ((scaled < 0) & (magnitude > 0)).to(torch.long) << 3).to(torch.uint8)
    code = code.reshape(w.shape)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, exponent.squeeze(-2).to(torch.int8)


def dequantize_fp4(packed: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(codes, exponents) from `quantize_fp4` -> w [..., K, N] in `dtype`."""
    code = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).long()  # [..., K, N]
    value = E2M1.to(packed.device)[code & 7] * torch.where(code >= 8, -1.0, 1.0)
    *lead, K, N = value.shape
    scale = torch.exp2(exponent.float()).unsqueeze(-2)  # [..., K/32, 1, N]
    return (value.reshape(*lead, K // BLOCK, BLOCK, N) * scale).reshape(*lead, K, N).to(dtype)


class FakeQuantFP4(torch.autograd.Function):
    """dequantize(quantize(w)) in forward, the gradient unchanged in backward (straight-through): training through
    FP4 weights keeps full-precision master weights and lets them learn to sit well on the FP4 grid."""

    @staticmethod
    def forward(ctx, w):
        return dequantize_fp4(*quantize_fp4(w), w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad
