"""An expert bank whose grouped GEMMs run in FP8 (lesson 13).

Each GEMM multiplies e4m3 rows by e4m3 weights and accumulates in fp32: the rows get one scale each (row-wise),
the weights one per output column of each expert (column-wise), and the product is rescaled by both,
out[m, n] = (q_x[m] · q_w[:, n]) · s_x[m] · s_w[n]. On a Hopper GPU that is `torch._scaled_grouped_mm`, which
runs faster than the bf16 grouped GEMM (lesson 13's record). Elsewhere the bank computes the same
numbers the slow way (quantize, dequantize, grouped GEMM in fp32), so a CPU checks the same arithmetic.

Only the forward runs in FP8. The backward multiplies in the layer's dtype with the unquantized rows and weights,
treating the quantization as the identity (straight-through): a common simplification, which DeepSeek-V3 does not
make (it runs its backward GEMMs in FP8 too). The weights are quantized once per change: while serving, once.
Serving (no autograd) also lets the activation write the second GEMM's FP8 rows directly (`activate_and_quantize`,
one kernel on a GPU).

Shapes as in `dispatcher`: L experts held here, M rows grouped by local expert, H hidden, F inner size.
"""
from __future__ import annotations

import torch

from . import fp8_rows_kernel
from .experts import activate
from .experts_batched import GroupedExperts
from .fp8 import dequantize_fp8, fused_quantize_fp8, quantize_fp8
from .init import first_weight_name

_PROBED: dict = {}


def scaled_grouped_mm_support(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> tuple[bool, str]:
    """Whether `torch._scaled_grouped_mm` runs here, and why not: it needs a Hopper GPU (sm_90), bf16 out, and
    GEMM widths that are multiples of 16. Probed once per device by a tiny product."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device.type != "cuda":
        return False, f"no FP8 grouped GEMM on {device.type}: emulated (quantize, dequantize, fp32 GEMM)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False, f"torch's FP8 grouped GEMM is built for sm_90; {torch.cuda.get_device_name(device)} is not"
    if dtype != torch.bfloat16:
        return False, f"the FP8 grouped GEMM writes bfloat16, the layer is {dtype}"
    if any(w % 16 for w in widths):
        return False, f"the FP8 grouped GEMM needs widths that are multiples of 16, got {widths}"
    key = str(device)
    if key not in _PROBED:
        try:
            x = torch.randn(32, 32, device=device)
            w = torch.randn(2, 32, 32, device=device)
            q_x, s_x, q_wt, s_w = *quantize_rows(x), *quantize_columns(w)
            torch._scaled_grouped_mm(q_x, q_wt.transpose(-2, -1), s_x, s_w,
                                     offs=torch.tensor([16, 32], device=device, dtype=torch.int32),
                                     out_dtype=torch.bfloat16)
            _PROBED[key] = (True, "torch._scaled_grouped_mm (FP8)")
        except RuntimeError as e:
            _PROBED[key] = (False, f"torch._scaled_grouped_mm failed here: {str(e).splitlines()[0]}")
    return _PROBED[key]


def quantize_rows(x_MK: torch.Tensor):
    """(q [M, K] e4m3, scales [M]): one scale per row. bf16 rows on a GPU: one pass of `fp8_rows_kernel`."""
    if fp8_rows_kernel.usable(x_MK):
        return fp8_rows_kernel.rows_to_fp8(x_MK)
    q, scale = fused_quantize_fp8(x_MK, x_MK.shape[1])
    return q, scale.squeeze(1)


def quantize_columns(w_LKN: torch.Tensor):
    """(q_t [L, N, K] e4m3, scales [L, N]): one scale per output column of each expert. Stored transposed,
    [L, N, K] contiguous, which is the column-major right operand the FP8 kernel takes."""
    L, K, N = w_LKN.shape
    q, scale = quantize_fp8(w_LKN.transpose(1, 2).reshape(L * N, K), K)
    return q.view(L, N, K), scale.view(L, N)


def activate_and_quantize(h, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, row scales [M]) of activate(h): on a GPU (bf16) one pass of `fp8_rows_kernel`, which writes the
    FP8 rows without writing the activation first; the plain ops elsewhere."""
    if fp8_rows_kernel.usable(h):
        halves = h.chunk(2, dim=-1) if activation == "swiglu" else (h, None)  # x·w1 and x·w3, side by side
        return fp8_rows_kernel.rows_to_fp8(*halves, activation)
    return quantize_rows(activate(h, activation).contiguous())


def _grouped_mm_plain(a, b, sizes, offs, kernel: bool):
    """a [M, K] @ b[g] [K, N] per group of rows, in the inputs' dtype (the backward's GEMMs)."""
    if kernel:
        return torch._grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[2])
    for g, (a_g, out_g) in enumerate(zip(a.split(sizes), out.split(sizes))):
        torch.mm(a_g, b[g], out=out_g)
    return out


def _weight_grad(x, grad, sizes, offs, kernel: bool):
    """[L, K, N]: per group, x_gᵀ · grad_g."""
    if kernel:
        return torch._grouped_mm(x.t(), grad, offs=offs)
    return torch.stack([x_g.t() @ g_g for x_g, g_g in zip(x.split(sizes), grad.split(sizes))])


def fp8_grouped_mm(q_x, s_x, q_w, sizes, offs, kernel: bool, fast_accum: bool, out_dtype) -> torch.Tensor:
    """Quantized rows (q_x [M, K], s_x [M]) times quantized weights (q_wt [L, N, K], s_w [L, N]) per group of
    rows -> [M, N] in out_dtype: the FP8 kernel, or the same numbers emulated (dequantize both, fp32 GEMM).
    fast_accum: the kernel's faster, less precise accumulation (torchao's float8 training uses it for the forward
    GEMM); the emulation always accumulates in fp32."""
    q_wt, s_w = q_w
    if kernel:
        return torch._scaled_grouped_mm(q_x, q_wt.transpose(-2, -1), s_x, s_w, offs=offs, out_dtype=out_dtype,
                                        use_fast_accum=fast_accum)
    x_deq = dequantize_fp8(q_x, s_x.unsqueeze(1), torch.float32)
    L, N, K = q_wt.shape
    w_deq = dequantize_fp8(q_wt.reshape(L * N, K), s_w.reshape(L * N, 1), torch.float32).view(L, N, K)
    return _grouped_mm_plain(x_deq, w_deq.transpose(1, 2), sizes, None, False).to(out_dtype)


class Fp8GroupedMM(torch.autograd.Function):
    """[M, K] rows grouped by expert times `weight` [L, K, N]: one FP8 grouped GEMM -> [M, N] in the rows' dtype
    (for w13 the gate and the up projection share their input, so they share its quantization and the launch).
    Backward: straight-through, in the rows' dtype."""

    @staticmethod
    def forward(ctx, x_MK, sizes, offs, kernel: bool, fast_accum: bool, q_w, weight):
        ctx.save_for_backward(x_MK, offs, weight)
        ctx.sizes, ctx.kernel = sizes, kernel
        return fp8_grouped_mm(*quantize_rows(x_MK), q_w, sizes, offs, kernel, fast_accum, x_MK.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, offs, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _grouped_mm_plain(grad, weight.transpose(1, 2), ctx.sizes, offs, ctx.kernel)
        return grad_x, None, None, None, None, None, _weight_grad(x, grad, ctx.sizes, offs, ctx.kernel)


class Fp8Experts(GroupedExperts):
    """The grouped bank of lesson 04 with its GEMMs in FP8; `.path` says whether the kernel ran or the emulation."""

    same_function_as_loop = False  # it rounds to FP8: the single-device reference must run this bank too
    emulate = False  # True: the emulation even where the kernel runs (lesson 13's record compares the two)
    fast_accum = True  # the kernel's fast accumulation in the forward GEMMs (the record measures both)

    def __init__(self, cfg, experts: range, ffn_slice: slice | None = None):
        if ffn_slice is not None and ffn_slice != slice(0, cfg.ffn_dim):
            raise ValueError("experts 'fp8' scales each column of w2 over the whole F; a tensor-parallel rank holds "
                             "a slice of F and would scale it differently: use it with an EP dispatcher")
        super().__init__(cfg, experts, ffn_slice)
        self._quantized: dict = {}  # weight names -> (versions, quantized weights)

    def quantized_weights(self, name: str):
        """The FP8 weight `name`, [L, N, K], and its scales [L, N]; quantized again only when the weight has
        changed (an optimizer step), so serving quantizes once."""
        weight = getattr(self, name)
        stamp = (weight._version, weight.data_ptr())
        cached = self._quantized.get(name)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                self._quantized[name] = cached = (stamp, quantize_columns(weight))
        return cached[1]

    def forward(self, x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        F = self.w2.shape[1]
        kernel, why = scaled_grouped_mm_support(x_MH.device, x_MH.dtype, (self.cfg.hidden_dim, F))
        if kernel and self.emulate:
            kernel, why = False, "emulated (quantize, dequantize, fp32 GEMM): Fp8Experts.emulate is set"
        self.path = why
        offs = torch.cumsum(counts_L, 0).to(torch.int32) if kernel else None
        if not kernel and sizes is None:
            sizes = counts_L.tolist()  # the emulation slices on the host
        first = first_weight_name(self.cfg)
        q_first, q_w2 = self.quantized_weights(first), self.quantized_weights("w2")
        fast = kernel and self.fast_accum
        if not torch.is_grad_enabled():  # serving: no graph to keep, so the activation can write FP8 directly
            h = fp8_grouped_mm(*quantize_rows(x_MH), q_first, sizes, offs, kernel, fast, x_MH.dtype)
            q_h, s_h = activate_and_quantize(h, self.cfg.activation)
            return fp8_grouped_mm(q_h, s_h, q_w2, sizes, offs, kernel, fast, x_MH.dtype)
        h = Fp8GroupedMM.apply(x_MH, sizes, offs, kernel, fast, q_first, getattr(self, first))
        hidden = activate(h, self.cfg.activation)
        return Fp8GroupedMM.apply(hidden, sizes, offs, kernel, fast, q_w2, self.w2)
