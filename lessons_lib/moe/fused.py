"""The memory-bound work around the expert GEMMs, one pass each (lesson 04).

At the DeepSeek-V3-like shape the three grouped GEMMs are most of a training step. What the layer does around
them reads and writes [T·k, H] or [T·k, F] tensors, each pass a fraction of a millisecond on an H200, and
written as PyTorch ops most steps take several passes: the combine gathered each token's k rows into a new
tensor and read them again in a batched matmul, and autograd's backward of the dispatch's gather scatters with
atomic adds. Here each step is one function, with its backward written out:

- `ExpandRows`: x_TH -> one row per (token, slot) pair, grouped by expert (the dispatch's gather); backward:
  each token's gradient is the sum of its k rows' gradients, a gather and a sum in one pass.
- `CombineRows`: y[t] = Σ_s weight[t, s] · rows[the row of pair (t, s)] in one pass (fp32 sums); backward: one
  pass gives the rows' gradient and the weights'.
- `SwiGLU`: silu(a) · b for h = [a | b] (x·w13, the gate's and the up projection's columns side by side), one pass
  forward and one back, which writes the gradient of h as one [rows, 2F] tensor, the one the backward GEMM of w13
  reads (autograd keeps silu(a) as well and runs three kernels).

On a GPU with Triton the gathers and sums run as the hand-written kernels of `gather_sum_kernel` (torch.compile's
reduction over the k rows was several times off the bandwidth limit), and SwiGLU is compiled by torch.compile
(`fuse`). Elsewhere (a CPU), while a CUDA graph is being recorded (SwiGLU), or where compiling fails, the same
plain functions run as they are: they are the reference the tests check, and the kernels compute the same thing.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from . import gather_sum_kernel


def fuse(fn):
    """`fn` (tensors in, tensors out), compiled by torch.compile on a CUDA device and run as it is elsewhere.

    Only the first dimension of each tensor (the rows, which change every step) is left to vary, so a new row
    count does not compile again; the widths (H, F, k) stay constants, which a compiled reduction needs to be
    fast. A compile failure is reported once and the plain function runs from then on."""
    compiled, failed = None, []

    @functools.wraps(fn)
    def run(*tensors):
        nonlocal compiled
        t = tensors[0]
        if t.device.type != "cuda" or failed or t.shape[0] < 2 or torch.cuda.is_current_stream_capturing():
            return fn(*tensors)  # (a row count of 0 or 1 is a constant to the compiler: plain ops, it is tiny)
        if compiled is None:
            compiled = torch.compile(fn)
        try:
            for x in tensors:
                torch._dynamo.maybe_mark_dynamic(x, 0)
            return compiled(*tensors)
        except Exception as e:  # noqa: BLE001 (no working compiler here: the plain ops are right, only slower)
            failed.append(e)
            warnings.warn(f"lessons_lib.moe.fused: torch.compile of {fn.__name__} failed ({type(e).__name__}); "
                          "running the plain ops", stacklevel=2)
            return fn(*tensors)

    return run


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32, where the sums and products are done (bf16 rounds once, at the end)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def sum_rows(rows_RH: torch.Tensor, row_of_pair_Tk: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_s rows[row_of_pair[t, s]]: [T, H], summed in at least fp32."""
    if gather_sum_kernel.usable(rows_RH):
        return gather_sum_kernel.gather_sum(rows_RH, row_of_pair_Tk)
    T, k = row_of_pair_Tk.shape
    picked = rows_RH.index_select(0, row_of_pair_Tk.flatten()).view(T, k, rows_RH.shape[1])
    return wide(picked).sum(1).to(rows_RH.dtype)


def weighted_sum_rows(rows_RH: torch.Tensor, row_of_pair_Tk: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_s weights[t, s] · rows[row_of_pair[t, s]]: [T, H], weighted and summed in at least fp32."""
    if gather_sum_kernel.usable(rows_RH):
        return gather_sum_kernel.gather_sum(rows_RH, row_of_pair_Tk, weights_Tk)
    T, k = row_of_pair_Tk.shape
    picked = rows_RH.index_select(0, row_of_pair_Tk.flatten()).view(T, k, rows_RH.shape[1])
    return (wide(picked) * wide(weights_Tk).unsqueeze(-1)).sum(1).to(rows_RH.dtype)


def weighted_sum_rows_backward(grad_TH, rows_RH, row_of_pair_Tk, weights_Tk, token_R, pair_R):
    """The gradients of `weighted_sum_rows`: (grad rows [R, H], grad weights [T, k] fp32, or fp64 for fp64 rows),
    where row r is pair pair_R[r] of token token_R[r]: grad_rows[r] = its weight · grad[token_R[r]], and the
    weight's gradient is <grad[token_R[r]], rows[r]>."""
    if gather_sum_kernel.usable(rows_RH):
        return gather_sum_kernel.scale_and_dot(grad_TH, rows_RH, row_of_pair_Tk, weights_Tk)
    weight_R = weights_Tk.flatten().index_select(0, pair_R)
    g = wide(grad_TH.index_select(0, token_R))
    R, H = rows_RH.shape
    # the dot products as a batched matmul, which sums in the order lesson 01's bmm combine did: an FP8 bank
    # compared with itself (lesson 13) rounds differently when the weights' gradients move by an ulp
    dot_R = torch.bmm(g.view(R, 1, H), wide(rows_RH).view(R, H, 1)).view(R)
    grad_weights = dot_R.index_select(0, row_of_pair_Tk.flatten()).view(row_of_pair_Tk.shape)  # (token, slot) order
    return (g * wide(weight_R).unsqueeze(-1)).to(rows_RH.dtype), grad_weights


@fuse
def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


@fuse
def swiglu_backward(grad, h):
    """grad of h = [a | b] for silu(a) · b, computed in at least fp32: d silu(a)/da = σ(a) · (1 + a · (1 - σ(a))).
    One [rows, 2F] tensor (under torch.compile one kernel writes both halves)."""
    a, b = h.chunk(2, dim=-1)
    g, a_ = wide(grad), wide(a)
    s = torch.sigmoid(a_)
    grad_a = g * wide(b) * s * (1 + a_ * (1 - s))
    return torch.cat([grad_a.to(h.dtype), (g * a_ * s).to(h.dtype)], dim=-1)


class ExpandRows(torch.autograd.Function):
    """x_TH -> rows_RH = x_TH[token_R], where the rows are exactly the T·k (token, slot) pairs (a dropless
    routing: `dispatch_local.RowIndex.every_pair`) and row_of_pair_Tk says which row each pair became. Backward:
    grad_x[t] = Σ_s grad_rows[row_of_pair[t, s]], a gather and sum (`sum_rows`) instead of a scatter."""

    @staticmethod
    def forward(ctx, x_TH, token_R, row_of_pair_Tk):
        ctx.save_for_backward(row_of_pair_Tk)
        return x_TH.index_select(0, token_R)

    @staticmethod
    def backward(ctx, grad_RH):
        (row_of_pair_Tk,) = ctx.saved_tensors
        return sum_rows(grad_RH.contiguous(), row_of_pair_Tk), None, None


class CombineRows(torch.autograd.Function):
    """rows_RH (one per (token, slot) pair, in any order: row_of_pair_Tk says where each pair's row is, token_R
    and pair_R what each row is) -> y_TH = each token's k rows weighted by weights_Tk and summed."""

    @staticmethod
    def forward(ctx, rows_RH, weights_Tk, row_of_pair_Tk, token_R, pair_R):
        ctx.save_for_backward(rows_RH, weights_Tk, row_of_pair_Tk, token_R, pair_R)
        return weighted_sum_rows(rows_RH, row_of_pair_Tk, weights_Tk)

    @staticmethod
    def backward(ctx, grad_TH):
        rows_RH, weights_Tk, row_of_pair_Tk, token_R, pair_R = ctx.saved_tensors
        grad_rows, grad_weights = weighted_sum_rows_backward(grad_TH.contiguous(), rows_RH, row_of_pair_Tk,
                                                             weights_Tk, token_R, pair_R)
        grad_weights = grad_weights.to(weights_Tk.dtype) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_weights, None, None, None


class SwiGLU(torch.autograd.Function):
    """h [..., 2F] = [a | b] -> silu(a) · b [..., F], saving only h for backward."""

    @staticmethod
    def forward(ctx, h):
        if h.shape[-1] % 2:
            raise ValueError(f"SwiGLU takes the gate's and the up projection's columns side by side: an even width, "
                             f"got {h.shape[-1]}")
        ctx.save_for_backward(h)
        return swiglu_forward(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_backward(grad.contiguous(), h)
