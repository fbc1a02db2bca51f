"""An expert bank with FP4 weights (lesson 13): DeepSeek-V4 stores its routed experts in FP4.

Weight-only: the weights are MXFP4 (`fp4`), the rows and the GEMMs stay in the layer's dtype. Right before each
forward the bank dequantizes its weights and runs lesson 04's grouped GEMM on them. Two states:
- training (the default): full-precision master weights, used through `fp4.FakeQuantFP4`, so the forward sees
  exactly the FP4 weights and the gradient reaches the master weights unchanged (straight-through). Fine-tuning
  this way lets the weights settle where FP4 rounds them well.
- serving, after `freeze()`: only the packed codes and scales are kept, 4.25 bits a weight, and the master
  weights are gone. `weight_bytes()` counts what the bank holds.
The shared expert (lesson 08) is not part of the bank, and stays in the layer's dtype, as DeepSeek-V4's does.

Shapes as in `dispatcher`: L experts held here, M rows grouped by local expert, H hidden, F inner size.
"""
from __future__ import annotations

import torch

from .experts_batched import GroupedExperts
from .fp4 import BLOCK, FakeQuantFP4, dequantize_fp4, quantize_fp4
from .init import first_weight_name


class Fp4Experts(GroupedExperts):
    """The grouped bank of lesson 04 reading MXFP4 weights."""

    same_function_as_loop = False  # it rounds its weights: the single-device reference must run this bank too

    def __init__(self, cfg, experts: range, ffn_slice: slice | None = None):
        if ffn_slice is not None and ffn_slice != slice(0, cfg.ffn_dim):
            raise ValueError("experts 'fp4' quantizes blocks along F in w2; a tensor-parallel rank's slice of F "
                             "would cut them: use it with an EP dispatcher")
        if cfg.hidden_dim % BLOCK or cfg.ffn_dim % BLOCK:
            raise ValueError(f"experts 'fp4' quantizes blocks of {BLOCK} along H and F: both must be multiples of "
                             f"{BLOCK}, got H={cfg.hidden_dim}, F={cfg.ffn_dim}")
        super().__init__(cfg, experts, ffn_slice)
        self.frozen = False

    def weights(self):
        names = (first_weight_name(self.cfg), "w2")
        if self.frozen:
            return tuple(dequantize_fp4(getattr(self, f"{n}_codes"), getattr(self, f"{n}_exponents"),
                                        self.cfg.torch_dtype) for n in names)
        return tuple(FakeQuantFP4.apply(getattr(self, n)) for n in names)

    @torch.no_grad()
    def freeze(self) -> None:
        """For serving: keep only the packed FP4 codes and exponents of each weight, drop the master weights."""
        if self.frozen:
            return
        for name, p in list(self.named_parameters(recurse=False)):
            codes, exponents = quantize_fp4(p)
            delattr(self, name)
            self.register_buffer(f"{name}_codes", codes)
            self.register_buffer(f"{name}_exponents", exponents)
        self.frozen = True

    def weight_bytes(self) -> int:
        """Bytes of the expert weights this bank holds: the master weights, or after `freeze()` the packed ones."""
        tensors = list(self.buffers()) if self.frozen else list(self.parameters())
        return sum(t.numel() * t.element_size() for t in tensors)
