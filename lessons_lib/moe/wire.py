"""What a dispatched row travels as (lesson 12).

Lessons 02-11 send each row as it is: H values in the layer's dtype, 2·H bytes in bf16. DeepSeek-V3 sends the
dispatch in FP8 instead: each row quantized to e4m3 with one fp32 scale per 128 channels (`fp8`), H + 4·H/128
bytes, about 0.52 of bf16. The combine comes back in the layer's dtype: its rows are sums the next layer reads,
and the weighted sum of k of them would compound the rounding.

`Fp8Wire` packs a row's FP8 values and its scales into one row of bytes, so one all-to-all (or all_gather)
carries both, and unpacks them on the receiver. The collectives of the dispatchers take `wire=` (None: rows as
they are). The gradient of the dispatched rows travels back in the layer's dtype: the quantization's derivative
is taken as the identity (straight-through), as `fp8.FakeQuantFP8` does on one device.
"""
from __future__ import annotations

import torch

from .config import FP8_TILE
from .fp8 import FP8, dequantize_fp8, fused_quantize_fp8


class Fp8Wire:
    """Rows [M, H] in `dtype` <-> payload [M, H + 4·H/tile] uint8: H bytes of e4m3 values, then the fp32 scales."""

    def __init__(self, hidden_dim: int, dtype: torch.dtype, tile: int = FP8_TILE):
        if hidden_dim % tile:
            raise ValueError(f"an FP8 dispatch has one scale per {tile} channels: hidden_dim ({hidden_dim}) must be "
                             f"a multiple of {tile}")
        self.hidden_dim, self.dtype, self.tile = hidden_dim, dtype, tile
        self.row_bytes = hidden_dim + 4 * (hidden_dim // tile)

    def encode(self, x_MH: torch.Tensor) -> torch.Tensor:
        q_MH, scale = fused_quantize_fp8(x_MH, self.tile)
        return torch.cat([q_MH.view(torch.uint8), scale.view(torch.uint8)], dim=1)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        H = self.hidden_dim
        q_MH = payload[:, :H].view(FP8)
        scale = payload[:, H:].contiguous().view(torch.float32)
        return dequantize_fp8(q_MH, scale, self.dtype)

    def empty_payload(self, rows: int, device) -> torch.Tensor:
        return torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=device)


def wire_for(cfg) -> Fp8Wire | None:
    """The wire a layer of `cfg` dispatches on: None (rows as they are) or FP8 (cfg.dispatch_dtype)."""
    if cfg.dispatch_dtype is None:
        return None
    return Fp8Wire(cfg.hidden_dim, cfg.torch_dtype)


def dispatch_row_bytes(cfg, wire: Fp8Wire | None) -> int:
    """Bytes one dispatched row takes on the wire."""
    return cfg.hidden_dim * cfg.torch_dtype.itemsize if wire is None else wire.row_bytes
