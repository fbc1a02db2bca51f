"""Lesson 05: the capacity formula, both drop policies, padding to static shapes, the drop rate."""
import math

import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.capacity import dropped_pairs, expert_capacity, padding_rows, select_within_capacity
from lessons_lib.moe.dispatch_local import rows_by_expert


def test_capacity_formula_is_exact():
    assert expert_capacity(MoEConfig(num_experts=16, top_k=2, capacity_factor=1.0), 32) == 4  # k·T/E = 4
    assert expert_capacity(MoEConfig(num_experts=16, top_k=2, capacity_factor=1.25), 32) == 5
    assert expert_capacity(MoEConfig(num_experts=16, top_k=2, capacity_factor=1.0), 33) == 5  # 4.125 -> 5
    # 50 · 1.1 is 55.00000000000001 in floats: a float ceil would give 56
    assert expert_capacity(MoEConfig(num_experts=2, top_k=2, capacity_factor=1.1), 50) == 55
    assert expert_capacity(MoEConfig(num_experts=16, top_k=2), 32) is None
    assert expert_capacity(MoEConfig(num_experts=16, top_k=2, capacity_factor=1.0), 0) == 0


EXPERT = torch.tensor([0, 1, 0, 0, 1])
WEIGHT = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2])


def test_probs_policy_keeps_the_heaviest_pairs():
    pick, counts = select_within_capacity(EXPERT, WEIGHT, 3, capacity=2, policy="probs")
    assert pick.tolist() == [2, 3, 1, 4] and counts.tolist() == [2, 2, 0]


def test_position_policy_keeps_the_first_pairs():
    pick, counts = select_within_capacity(EXPERT, WEIGHT, 3, capacity=2, policy="position")
    assert pick.tolist() == [0, 2, 1, 4] and counts.tolist() == [2, 2, 0]


def test_padding_fills_every_expert_to_capacity():
    pick, counts = select_within_capacity(EXPERT, WEIGHT, 3, capacity=3, policy="probs", pad=True)
    assert pick.tolist() == [2, 3, 0, 1, 4, -1, -1, -1, -1] and counts.tolist() == [3, 3, 3]
    counts_in = torch.bincount(EXPERT, minlength=3)
    assert padding_rows(counts_in, 3).item() == 4 and dropped_pairs(counts_in, 2).item() == 1


@pytest.mark.parametrize("policy, kept", [("probs", [2, 3, 1, 4]), ("position", [0, 2, 1, 4])])
def test_padding_with_drops_keeps_the_policys_rows(policy, kept):
    # expert 0 wants 3 rows, capacity 2: the one left over must not land in a slot
    pick, counts = select_within_capacity(EXPERT, WEIGHT, 3, capacity=2, policy=policy, pad=True)
    assert pick.tolist() == kept + [-1, -1] and counts.tolist() == [2, 2, 2]


def test_probs_policy_breaks_ties_by_token_order():
    pick, _ = select_within_capacity(torch.zeros(4, dtype=torch.long), torch.full((4,), 0.5), 1, capacity=2)
    assert pick.tolist() == [0, 1]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="drop policy"):
        select_within_capacity(EXPERT, WEIGHT, 3, capacity=2, policy="random")


def _layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, **kw)
    return MoELayer(cfg)


def _by_hand(layer, x):
    """y from first principles: for every expert, list its (token, slot) pairs, keep C by the policy."""
    cfg = layer.cfg
    r = layer.router(x)
    C = expert_capacity(cfg, len(x))
    y = torch.zeros_like(x)
    kept_pairs = 0
    for e in range(cfg.num_experts):
        pairs = [(t, s) for t in range(len(x)) for s in range(cfg.top_k) if r.expert_ids[t, s] == e]
        if cfg.drop_policy == "probs":
            pairs.sort(key=lambda p: -r.weights[p].item())  # stable: token order among equal weights
        for t, s in pairs[:C]:
            h = torch.nn.functional.gelu(x[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
            y[t] += r.weights[t, s] * h
            kept_pairs += 1
    return y, len(x) * cfg.top_k - kept_pairs


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
def test_layer_drops_exactly_what_the_policy_says(policy, pad):
    layer = _layer(capacity_factor=0.5, drop_policy=policy, pad_to_capacity=pad)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0] += 3.0  # a shared feature skews the routing, so some experts overflow
    y, aux = layer(x)
    expected, dropped = _by_hand(layer, x)
    assert dropped > 0 and aux.dropped.item() == dropped
    assert aux.drop_rate == pytest.approx(dropped / 24)
    assert aux.capacity == math.ceil(2 * 12 / 4 * 0.5) == 3
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_the_two_policies_drop_different_pairs():
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    x[:, 0] += 3.0
    y_probs, _ = _layer(capacity_factor=0.5, drop_policy="probs")(x)
    y_pos, _ = _layer(capacity_factor=0.5, drop_policy="position")(x)
    assert (y_probs - y_pos).abs().max() > 1e-3


def test_a_large_capacity_changes_nothing_and_padding_changes_no_value():
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    y_free, aux_free = _layer()(x)
    y_big, aux_big = _layer(capacity_factor=4.0)(x)  # C = 2·12/4·4 = 24 >= any expert's load
    assert aux_big.dropped.item() == 0 and aux_free.drop_rate == 0.0 and aux_free.capacity is None
    torch.testing.assert_close(y_big, y_free, rtol=1e-6, atol=1e-7)  # up to the order of the sums
    y_pad, _ = _layer(capacity_factor=4.0, pad_to_capacity=True)(x)
    torch.testing.assert_close(y_pad, y_free, rtol=1e-6, atol=1e-7)


def test_padded_rows_are_static_and_carry_nothing():
    layer = _layer(capacity_factor=1.0, pad_to_capacity=True)
    for seed in range(3):  # the shapes do not depend on the routing
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(seed))
        rows = rows_by_expert(layer.router(x), layer.cfg)
        assert rows.counts.tolist() == [5, 5, 5, 5] and len(rows.token) == 20
        demand = layer.router(x).tokens_per_expert(4)
        assert rows.real.sum() == demand.clamp(max=5).sum() < 20  # real rows: min(n_e, C) per expert; the rest padding
        assert (rows.pair[~rows.real] == -1).all() and (rows.token[~rows.real] == 0).all()
        assert not rows.every_pair
        assert (rows.expert == torch.arange(4).repeat_interleave(5)).all()


def test_a_token_that_loses_every_expert_outputs_zero_and_gradients_flow():
    layer = _layer(capacity_factor=0.25, drop_policy="position")  # C = ceil(2·8/4·0.25) = 1
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y, aux = layer(x)
    assert aux.capacity == 1 and aux.dropped.item() >= 16 - 4
    silent = (y == 0).all(dim=1)
    assert silent.sum() >= 8 - 4  # at most 4 pairs are kept, so at least 4 tokens get nothing
    y.sum().backward()
    # every pair of a silent token was dropped, so nothing of it reaches y: zero gradient
    assert (x.grad[silent] == 0).all() and (x.grad[~silent] != 0).any()


@pytest.mark.parametrize("pad", [False, True])
def test_capacity_edge_cases_through_the_layer(pad):
    empty = _layer(capacity_factor=1.0, pad_to_capacity=pad)
    y, aux = empty(torch.zeros(0, 8))
    assert y.shape == (0, 8) and aux.capacity == 0 and aux.dropped.item() == 0
    # top_k = E: every token picks every expert once, so C = ceil(k·T/E) = T holds them all
    every = MoELayer(MoEConfig(num_experts=4, top_k=4, hidden_dim=8, ffn_dim=16, capacity_factor=1.0,
                               pad_to_capacity=pad))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    y, aux = every(x)
    free = MoELayer(MoEConfig(num_experts=4, top_k=4, hidden_dim=8, ffn_dim=16))
    assert aux.capacity == 6 and aux.dropped.item() == 0
    torch.testing.assert_close(y, free(x)[0], rtol=1e-5, atol=1e-6)
