"""Lesson 04's experiment with empty groups (`lab.small_tiles`): the spread grouped GEMM multiplies the same rows by
the same experts (outputs and gradients), its weight view stays inside the weights, G is what torch's tile rule
needs, and `forced` leaves torch's function as it was."""
from contextlib import nullcontext

import pytest
import torch

from lessons_lib import MoEConfig
from lessons_lib.lab.equivalence import relative_error
from lessons_lib.lab.small_tiles import (
    MAX_GROUPS,
    SMALL_TILE_MAX_AVERAGE,
    forced,
    grouped_mm,
    groups_per_expert,
    spread,
)
from lessons_lib.moe.experts_batched import GroupedExperts

COUNTS = {"uneven, first empty": [0, 5, 1, 9, 3], "last empty": [4, 2, 6, 3, 0], "all in the last": [0, 0, 0, 0, 13],
          "no rows": [0, 0, 0, 0, 0]}


def _reference(x, w, offs, g):
    """torch's own grouped GEMM (the reference kernel on a CPU), outputs and gradients."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = torch._grouped_mm(x, w, offs=offs)
    (y * g).sum().backward()
    return y, x.grad, w.grad


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("transposed", [False, True])  # the weights as a transposed view, as backward passes them
def test_spread_grouped_mm_equals_torchs_in_outputs_and_gradients(G, case, transposed):
    gen = torch.Generator().manual_seed(G)
    counts = torch.tensor(COUNTS[case])
    L, K, N, M = len(counts), 16, 24, int(counts.sum())
    w = torch.randn(L, N, K, generator=gen).transpose(1, 2) if transposed else torch.randn(L, K, N, generator=gen)
    x, g = torch.randn(M, K, generator=gen), torch.randn(M, N, generator=gen)
    offs = counts.cumsum(0).to(torch.int32)
    y0, gx0, gw0 = _reference(x, w, offs, g)
    xi, wi = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = grouped_mm(xi, wi, offs, G)
    (y * g).sum().backward()
    for a, b in ((y, y0), (xi.grad, gx0), (wi.grad, gw0)):
        assert a.shape == b.shape and relative_error(a, b) <= 1e-6


def test_the_spread_view_puts_expert_e_at_group_G_e_and_stays_inside_the_weights():
    w = torch.arange(3 * 4 * 8, dtype=torch.float32).reshape(3, 4, 8)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    view, ends = spread(w, offs, 4)
    assert view.shape == (9, 4, 8) and view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert ends.tolist() == [2, 2, 2, 2, 2, 2, 2, 2, 7]  # empty groups end where their expert ends
    for e in range(3):
        assert torch.equal(view[4 * e], w[e])
    last = view.storage_offset() + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))
    assert last == w.numel() - 1  # the last element the view can reach is the weights' last


def test_groups_per_expert_brings_the_average_down_to_the_small_tile_rule():
    H, F2 = 7168, 4096  # the realistic shape's w13
    for rows, experts in ((32768, 64), (65536, 64), (32768, 32), (16384, 8), (1000, 4)):
        G = groups_per_expert(rows, experts, H * F2, 2)
        groups = G * (experts - 1) + 1
        assert rows / groups <= SMALL_TILE_MAX_AVERAGE < rows / ((G // 2) * (experts - 1) + 1) or G == 1
        assert groups < MAX_GROUPS
    assert groups_per_expert(32768, 64, H * F2, 2) == 8
    assert groups_per_expert(100 * 64, 64, H * F2, 2) == 1  # already small: nothing to add
    assert groups_per_expert(10_000, 1, H * F2, 2) == 1  # one expert: no group to put empty ones after
    assert groups_per_expert(131072, 64, H * F2, 2) == 1  # would need 2017 groups: over torch's limit
    assert groups_per_expert(32768, 64, 24, 2) == 1  # an expert stride of 24 elements does not split into 8 aligned


def test_forced_leaves_other_devices_alone_and_puts_torchs_function_back():
    """Off a Hopper GPU `forced` passes every call through unchanged, and torch._grouped_mm is torch's again after
    the block, even when the block raises."""
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, activation="swiglu")
    bank = GroupedExperts(cfg, range(4))
    bank.use_reference_kernel = True
    x, counts = torch.randn(600, 8), torch.tensor([200, 100, 0, 300])
    y = bank(x, counts)  # the bank's first call probes the kernel once
    original = torch._grouped_mm
    with pytest.raises(RuntimeError, match="inside"):
        with forced():
            assert torch._grouped_mm is not original
            inside = bank(x, counts)
            assert torch.equal(inside, y) and "SpreadGroupedMM" not in type(inside.grad_fn).__name__
            raise RuntimeError("inside")
    assert torch._grouped_mm is original


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the tile choice exists on Hopper GPUs only")
def test_on_a_hopper_gpu_forced_spreads_the_bank_and_computes_the_same_function():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=512, activation="swiglu", dtype="bfloat16")
    bank = GroupedExperts(cfg, range(8)).cuda()
    counts = torch.tensor([300, 0, 170, 129, 260, 97, 200, 244], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    results = []
    for context in (nullcontext, forced):
        bank.zero_grad(set_to_none=True)
        x.grad = None
        with context():
            y = bank(x, counts)
            (y * g).sum().backward()
            results.append([y.detach(), x.grad.clone(), bank.w13.grad.clone(), bank.w2.grad.clone()])
        # the bank's second GEMM ran through the spread groups inside forced(), torch's own op outside it
        assert ("SpreadGroupedMM" in type(y.grad_fn).__name__) == (context is forced)
    assert groups_per_expert(x.shape[0], 8, bank.w13.stride(0), 2) > 1
    for a, b in zip(*results):
        assert relative_error(a, b) <= 1e-2
