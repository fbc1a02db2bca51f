"""FP8 numbers: quantizing rows to e4m3 with one scale per tile of channels (lesson 12).

float8_e4m3fn has 4 exponent bits and 3 mantissa bits: values up to ±448, about 2 significant decimal digits.
A row of activations is quantized tile by tile: each tile of `tile` channels gets one fp32 scale, chosen so that
the tile's largest magnitude lands near 448, and stores q = x / scale rounded to e4m3. Dequantizing is q · scale.

Why tiles: one scale per row has to fit the row's largest channel, so a few outlier channels push every other
value of the row down towards e4m3's coarse small numbers. With a scale per 128 channels (DeepSeek-V3's 1×128
activation tiles) an outlier only costs its own tile.

The scales here are powers of two, 2^ceil(log2(amax / 448)). Multiplying and dividing by a power of two is exact,
so quantizing a row that was already quantized and dequantized gives the same values back: a dispatcher that
forwards rows over two hops (lesson 10) can re-encode them without changing a bit. The price is at most one bit of
range in the worst tile compared with the exact scale amax / 448.

Shapes: x_MH [M rows, H channels], tiles of size `tile` along H (H divisible by it), scales [M, H / tile].
"""
from __future__ import annotations

import torch

from .config import FP8_TILE  # 128 channels per scale: DeepSeek-V3's 1×128 activation tiles

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def tile_scales(x_MH: torch.Tensor, tile: int) -> torch.Tensor:
    """[M, H / tile] the power-of-two scale of each tile: the smallest 2^n with amax / 2^n <= 448 (1 for a tile
    of zeros)."""
    M, H = x_MH.shape
    if H % tile:
        raise ValueError(f"FP8 tiles of {tile} channels must divide the row width, got {H}")
    amax = x_MH.view(M, H // tile, tile).abs().amax(-1).float()
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_fp8(x_MH: torch.Tensor, tile: int = FP8_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x_MH -> (q_MH in float8_e4m3fn, scales [M, H / tile] fp32) with x ≈ q · scale tile by tile. The clamp only
    guards against log2 rounding a hair low: e4m3fn has no infinity, and a value past 448 would become NaN."""
    M, H = x_MH.shape
    scale = tile_scales(x_MH, tile)
    q = (x_MH.float().view(M, H // tile, tile) / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    return q.view(M, H).to(FP8), scale


def dequantize_fp8(q_MH: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q, scales) from `quantize_fp8` -> the rows in `dtype`; the tile size is read from the shapes."""
    M, H = q_MH.shape
    tiles = scale.shape[1]
    return (q_MH.float().view(M, tiles, H // tiles) * scale.unsqueeze(-1)).view(M, H).to(dtype)


class FakeQuantFP8(torch.autograd.Function):
    """dequantize(quantize(x)) in forward; in backward the gradient passes through unchanged (straight-through:
    rounding has zero derivative almost everywhere, so the usual choice is to treat it as the identity). The
    single-device layer applies it where a dispatcher would put its rows on the wire, so both compute the same."""

    @staticmethod
    def forward(ctx, x_MH, tile: int = FP8_TILE):
        return dequantize_fp8(*quantize_fp8(x_MH, tile), x_MH.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


_COMPILED: dict = {}


def fused_quantize_fp8(x_MH: torch.Tensor, tile: int = FP8_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8` fused into one kernel by torch.compile on a GPU (read each row once, write FP8 and scales);
    the plain ops elsewhere, or if compiling fails. The plain function is the reference it is tested against.
    One compiled function per tile size, with the tile a constant and only the row count dynamic: a reduction
    whose length the compiler does not know runs several times slower."""
    if x_MH.device.type != "cuda" or _COMPILED.get("failed") or x_MH.shape[1] % tile:
        return quantize_fp8(x_MH, tile)  # (the last: the plain function's clear error, not a compiler's)
    if tile not in _COMPILED:
        def quantize_tiles(x):
            return quantize_fp8(x, tile)
        _COMPILED[tile] = torch.compile(quantize_tiles)
    try:
        torch._dynamo.mark_dynamic(x_MH, 0)  # the rows a rank receives change every step
        return _COMPILED[tile](x_MH)
    except Exception as e:  # noqa: BLE001 (no working compiler here: the plain ops are right, only slower)
        _COMPILED["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return quantize_fp8(x_MH, tile)
