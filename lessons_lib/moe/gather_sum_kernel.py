"""Triton kernels for the layer's gathers and sums between tokens and rows (lesson 04).

The combine reads each token's k expert rows and writes one weighted sum; the dispatch's backward does the same
without weights; the combine's backward writes each row's gradient (its weight times its token's gradient) and
each weight's gradient (a dot product over H). Each is a pass over [T·k, H] bf16 values: on an H200 a fraction of
a millisecond at the bandwidth limit. Written as PyTorch ops, or compiled by torch.compile, the reduction over
the k rows ran several times slower than that (lesson 04's record). Here one program handles one token (or one
row) and a block of H columns: it loads the k rows' blocks, sums in fp32 registers and writes once.

`fused` calls these on a GPU where Triton is installed; elsewhere it runs the same sums as plain PyTorch ops,
which are the reference they are checked against (fp32 sums, one rounding at the end, in both).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None


def usable(rows: torch.Tensor) -> bool:
    """Whether the kernels can run on `rows`: a CUDA tensor of a float type, with Triton installed."""
    return triton is not None and rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _block(width: int) -> int:
    return min(1024, triton.next_power_of_2(width))


if triton is not None:
    @triton.jit
    def _gather_sum(rows_ptr, index_ptr, weight_ptr, out_ptr, width, K: tl.constexpr, WEIGHTED: tl.constexpr,
                    BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(K):
            row = tl.load(index_ptr + token * K + s).to(tl.int64)
            v = tl.load(rows_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                v = v * tl.load(weight_ptr + token * K + s).to(tl.float32)
            acc += v
        tl.store(out_ptr + token * width + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_and_dot(grad_ptr, rows_ptr, index_ptr, weight_ptr, grad_rows_ptr, grad_weight_ptr, width,
                       K: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr):
        # one program per token: its gradient row is read once for its k rows
        token = tl.program_id(0).to(tl.int64)
        slots = tl.arange(0, K_POW2)
        dots = tl.zeros([K_POW2], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            g = tl.load(grad_ptr + token * width + cols, mask=mask, other=0.0).to(tl.float32)
            for s in tl.static_range(K):
                row = tl.load(index_ptr + token * K + s).to(tl.int64)
                w = tl.load(weight_ptr + token * K + s).to(tl.float32)
                tl.store(grad_rows_ptr + row * width + cols, (g * w).to(grad_rows_ptr.dtype.element_ty), mask=mask)
                v = tl.load(rows_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
                dots = tl.where(slots == s, dots + tl.sum(g * v, axis=0), dots)
        tl.store(grad_weight_ptr + token * K + slots, dots, mask=slots < K)


def gather_sum(rows_RH: torch.Tensor, row_of_pair_Tk: torch.Tensor, weights_Tk: torch.Tensor | None = None):
    """y[t] = Σ_s (weights[t, s] ·) rows[row_of_pair[t, s]]: [T, H] in rows' dtype, summed in fp32."""
    rows_RH, row_of_pair_Tk = rows_RH.contiguous(), row_of_pair_Tk.contiguous()
    (T, k), H = row_of_pair_Tk.shape, rows_RH.shape[1]
    out = rows_RH.new_empty(T, H)
    if T and H:
        weights = weights_Tk.contiguous() if weights_Tk is not None else row_of_pair_Tk  # (unread if unweighted)
        block = _block(H)
        _gather_sum[(T, triton.cdiv(H, block))](rows_RH, row_of_pair_Tk, weights, out, H, K=k,
                                                  WEIGHTED=weights_Tk is not None, BLOCK=block)
    return out


def scale_and_dot(grad_TH: torch.Tensor, rows_RH: torch.Tensor, row_of_pair_Tk: torch.Tensor,
                  weights_Tk: torch.Tensor):
    """The combine's backward in one pass over the rows: (grad_rows [R, H] in rows' dtype, grad_weights [T, k]
    fp32), grad_rows[row_of_pair[t, s]] = weights[t, s] · grad[t] and grad_weights[t, s] = <grad[t], that row>."""
    grad_TH, rows_RH, row_of_pair_Tk = grad_TH.contiguous(), rows_RH.contiguous(), row_of_pair_Tk.contiguous()
    (T, k), H = row_of_pair_Tk.shape, rows_RH.shape[1]
    grad_rows = torch.empty_like(rows_RH)
    grad_weights = torch.zeros(T, k, device=rows_RH.device, dtype=torch.float32)
    if T and H:
        _scale_and_dot[(T,)](grad_TH, rows_RH, row_of_pair_Tk, weights_Tk.contiguous(), grad_rows, grad_weights, H,
                             K=k, K_POW2=triton.next_power_of_2(k), BLOCK=_block(H))
    return grad_rows, grad_weights
