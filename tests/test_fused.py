"""Lesson 04's one-pass steps (`moe.fused`) against the same math written with autograd: outputs and gradients."""
import pytest
import torch
import torch.nn.functional as F

from lessons_lib.moe import gather_sum_kernel
from lessons_lib.moe.fused import CombineRows, ExpandRows, SwiGLU

T, K, H = 7, 3, 5


def routing(seed):
    g = torch.Generator().manual_seed(seed)
    pair = torch.randperm(T * K, generator=g)  # row r is pair pair[r]
    row_of_pair = torch.empty_like(pair)
    row_of_pair[pair] = torch.arange(T * K)
    return g, pair, pair // K, row_of_pair.view(T, K)


def test_expand_rows_backward_sums_each_tokens_rows():
    g, pair, token, row_of_pair = routing(0)
    x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(T * K, H, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(ExpandRows.apply(x, token, row_of_pair), x, grad)
    (ref,) = torch.autograd.grad(x[token], x, grad)
    torch.testing.assert_close(ExpandRows.apply(x, token, row_of_pair), x[token])
    torch.testing.assert_close(ours, ref)
    assert ref.abs().max() > 0.1


def test_combine_rows_equals_a_weighted_sum_in_outputs_and_gradients():
    g, pair, token, row_of_pair = routing(1)
    rows = torch.randn(T * K, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(T, H, generator=g, dtype=torch.float64)
    ours = CombineRows.apply(rows, w, row_of_pair, token, pair)
    ref = (rows[row_of_pair] * w.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (rows, w), grad), torch.autograd.grad(ref, (rows, w), grad)):
        torch.testing.assert_close(a, b)
        assert b.abs().max() > 0.1


def test_combine_rows_in_bf16_sums_in_fp32():
    g, pair, token, row_of_pair = routing(2)
    rows = torch.randn(T * K, H, generator=g)
    w = torch.rand(T, K, generator=g)
    exact = (rows.bfloat16().double()[row_of_pair] * w.double().unsqueeze(-1)).sum(1)
    ours = CombineRows.apply(rows.bfloat16(), w, row_of_pair, token, pair).double()
    assert ((ours - exact).abs() / exact.abs().clamp_min(1e-3)).max() <= 2 ** -8  # one bf16 rounding, at the end


def test_swiglu_backward_equals_autograds():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 12, generator=g, dtype=torch.float64, requires_grad=True)  # [a | b], 6 columns each
    grad = torch.randn(11, 6, generator=g, dtype=torch.float64)
    ours, ref = SwiGLU.apply(h), F.silu(h[:, :6]) * h[:, 6:]
    torch.testing.assert_close(ours, ref)
    (ours_grad,), (ref_grad,) = torch.autograd.grad(ours, h, grad), torch.autograd.grad(ref, h, grad)
    torch.testing.assert_close(ours_grad, ref_grad)
    assert ours_grad[:, :6].abs().min() > 0 and ours_grad[:, 6:].abs().min() > 0  # both halves written
    with pytest.raises(ValueError, match="even width"):
        SwiGLU.apply(torch.zeros(2, 5))


@pytest.mark.skipif(not (torch.cuda.is_available() and gather_sum_kernel.triton is not None),
                    reason="the Triton kernels need a GPU and Triton")
def test_the_triton_kernels_compute_the_plain_ops_sums():
    """On a GPU: `gather_sum_kernel` against fp64 sums of the same rows (bf16: one rounding of the exact sum, so
    at most one bf16 ulp off; fp32: fp32 rounding), at a width that is not a multiple of the kernels' block."""
    t, k, h = 300, 8, 7168 + 40
    g = torch.Generator(device="cuda").manual_seed(0)
    pair = torch.randperm(t * k, device="cuda", generator=g)
    row_of_pair = torch.empty_like(pair)
    row_of_pair[pair] = torch.arange(t * k, device="cuda")
    row_of_pair = row_of_pair.view(t, k)
    weights = torch.rand(t, k, device="cuda", generator=g)
    token = pair // k
    for dtype in (torch.float32, torch.bfloat16):
        rows = torch.randn(t * k, h, device="cuda", generator=g).to(dtype)
        grad = torch.randn(t, h, device="cuda", generator=g).to(dtype)
        half_ulp = 2 ** -8 if dtype == torch.bfloat16 else 0.0  # of the final rounding, relative

        def assert_sum_close(ours, exact, abs_sum):  # the final rounding, plus fp32 summation error
            assert ((ours.double() - exact).abs() <= half_ulp * exact.abs() + 2 ** -20 * abs_sum).all()

        picked = rows.double()[row_of_pair]
        w = weights.double().unsqueeze(-1)
        assert_sum_close(gather_sum_kernel.gather_sum(rows, row_of_pair, weights), (picked * w).sum(1),
                         (picked.abs() * w).sum(1))
        assert_sum_close(gather_sum_kernel.gather_sum(rows, row_of_pair), picked.sum(1), picked.abs().sum(1))
        grad_rows, grad_weights = gather_sum_kernel.scale_and_dot(grad, rows, row_of_pair, weights)
        scaled = grad.double()[token] * weights.flatten()[pair].double().unsqueeze(-1)
        assert ((grad_rows.double() - scaled).abs() <= (2 * half_ulp + 2 ** -23) * scaled.abs()).all()
        products = grad.double()[token] * rows.double()
        assert_sum_close(grad_weights, products.sum(-1)[row_of_pair], products.abs().sum(-1)[row_of_pair])
