import pytest
import torch

from lessons_lib import MoEConfig, experts_of_rank, init_full_state_dict
from lessons_lib.moe.experts import LoopExperts
from lessons_lib.moe.init import init_expert_weights


@pytest.mark.parametrize("activation, names", [("gelu", {"w1", "w2"}), ("swiglu", {"w13", "w2"})])
def test_shapes_and_names(activation, names):
    cfg = MoEConfig(num_experts=6, hidden_dim=8, ffn_dim=12, activation=activation)
    bank = LoopExperts(cfg, range(6))
    assert {n for n, _ in bank.named_parameters()} == names
    w_in, w2 = bank.weights()
    assert w_in.shape == (6, 8, 24 if activation == "swiglu" else 12) and w2.shape == (6, 12, 8)
    sd = init_full_state_dict(cfg)
    assert set(sd) == {"router.weight"} | {f"experts.{n}" for n in names}
    assert sd["router.weight"].shape == (6, 8)


def test_a_rank_draws_exactly_its_slice_of_the_full_weights():
    cfg = MoEConfig(num_experts=8, hidden_dim=8, ffn_dim=16, activation="swiglu", seed=5)
    full = init_full_state_dict(cfg)
    for rank in range(4):
        mine = experts_of_rank(8, rank, 4)
        part = init_expert_weights(cfg, mine)
        for name in ("w13", "w2"):
            assert torch.equal(part[name], full[f"experts.{name}"][mine.start:mine.stop])
    assert not torch.equal(init_full_state_dict(MoEConfig(seed=6))["router.weight"],
                           init_full_state_dict(MoEConfig(seed=7))["router.weight"])


def test_experts_of_rank():
    assert experts_of_rank(8, 1, 2) == range(4, 8)
    assert experts_of_rank(4, 3, 4) == range(3, 4)
    with pytest.raises(ValueError, match="divisible"):
        experts_of_rank(6, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        experts_of_rank(8, 2, 2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loop_bank_runs_each_group_through_its_expert(activation):
    cfg = MoEConfig(num_experts=4, hidden_dim=8, ffn_dim=16, activation=activation)
    bank = LoopExperts(cfg, range(4))
    counts = torch.tensor([3, 0, 5, 1])  # an empty group included
    x = torch.randn(9, 8)
    y = bank(x, counts)
    starts = [0, 3, 3, 8, 9]
    w_in, w2 = bank.weights()
    for e in range(4):
        rows = x[starts[e]:starts[e + 1]]
        if activation == "swiglu":  # w13: the gate's 16 columns, then the up projection's
            h = torch.nn.functional.silu(rows @ w_in[e, :, :16]) * (rows @ w_in[e, :, 16:])
        else:
            h = torch.nn.functional.gelu(rows @ w_in[e])
        assert torch.allclose(y[starts[e]:starts[e + 1]], h @ w2[e], atol=1e-6)
    y.sum().backward()
    assert w_in.grad[1].abs().sum() == 0 and w_in.grad[0].abs().sum() > 0


def test_loop_bank_with_no_rows():
    cfg = MoEConfig(num_experts=2, hidden_dim=4, ffn_dim=4)
    y = LoopExperts(cfg, range(2))(torch.zeros(0, 4), torch.tensor([0, 0]))
    assert y.shape == (0, 4)


def test_w13_holds_the_gate_then_the_up_projection_each_drawn_as_before():
    """w13's halves are w1 and w3 drawn from their own generators, so the weights (and every record made with them)
    are the same as when the two were stored apart; a tensor-parallel rank keeps the same columns of both halves."""
    from lessons_lib.moe.init import _generator

    cfg = MoEConfig(num_experts=3, hidden_dim=8, ffn_dim=6, activation="swiglu", seed=4)
    w13 = init_expert_weights(cfg, range(3))["w13"]
    for e in range(3):
        w1, w3 = (torch.randn(8, 6, generator=_generator(4, f"experts.{n}", e)) / 8 ** 0.5 for n in ("w1", "w3"))
        assert torch.equal(w13[e], torch.cat([w1, w3], dim=1))
    tp = LoopExperts(cfg, range(3), ffn_slice=slice(2, 4))
    full = init_full_state_dict(cfg)["experts.w13"]
    assert torch.equal(tp.w13, full[:, :, [2, 3, 8, 9]]) and tp.w2.shape == (3, 2, 8)
