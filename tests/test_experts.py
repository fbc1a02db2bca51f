import pytest
import torch

from lessons_lib import MoEConfig, experts_of_rank, init_full_state_dict
from lessons_lib.moe.experts import LoopExperts
from lessons_lib.moe.init import init_expert_weights


@pytest.mark.parametrize("activation, names", [("gelu", {"w1", "w2"}), ("swiglu", {"w1", "w2", "w3"})])
def test_shapes_and_names(activation, names):
    cfg = MoEConfig(num_experts=6, hidden_dim=8, ffn_dim=12, activation=activation)
    bank = LoopExperts(cfg, range(6))
    assert {n for n, _ in bank.named_parameters()} == names
    assert bank.w1.shape == (6, 8, 12) and bank.w2.shape == (6, 12, 8)
    if activation == "swiglu":
        assert bank.w3.shape == (6, 8, 12)
    sd = init_full_state_dict(cfg)
    assert set(sd) == {"router.weight"} | {f"experts.{n}" for n in names}
    assert sd["router.weight"].shape == (6, 8)


def test_a_rank_draws_exactly_its_slice_of_the_full_weights():
    cfg = MoEConfig(num_experts=8, hidden_dim=8, ffn_dim=16, activation="swiglu", seed=5)
    full = init_full_state_dict(cfg)
    for rank in range(4):
        mine = experts_of_rank(8, rank, 4)
        part = init_expert_weights(cfg, mine)
        for name in ("w1", "w2", "w3"):
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
    for e in range(4):
        rows = x[starts[e]:starts[e + 1]]
        h = rows @ bank.w1[e]
        h = torch.nn.functional.silu(h) * (rows @ bank.w3[e]) if activation == "swiglu" else torch.nn.functional.gelu(h)
        assert torch.allclose(y[starts[e]:starts[e + 1]], h @ bank.w2[e], atol=1e-6)
    y.sum().backward()
    assert bank.w1.grad[1].abs().sum() == 0 and bank.w1.grad[0].abs().sum() > 0


def test_loop_bank_with_no_rows():
    cfg = MoEConfig(num_experts=2, hidden_dim=4, ffn_dim=4)
    y = LoopExperts(cfg, range(2))(torch.zeros(0, 4), torch.tensor([0, 0]))
    assert y.shape == (0, 4)
