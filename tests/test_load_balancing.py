"""Lesson 06: DeepSeek-V3's router, group-limited selection, the z-loss and the bias update."""
import math

import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.load_balancing import SigmoidBiasRouter, allowed_by_group, router_z_loss, update_expert_bias
from lessons_lib.moe.router import Routing


def _router(**kw):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=4, ffn_dim=4, router="sigmoid_bias", **kw)
    r = SigmoidBiasRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))  # logits = x
    return r


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_sigmoid_router_weights_come_from_the_scores_normalized_and_scaled():
    out = _router(routed_scaling_factor=2.5)(torch.tensor([[0.0, 2.0, 1.0, -1.0]]))
    assert out.expert_ids.tolist() == [[1, 2]]
    expected = torch.tensor([sig(2), sig(1)]) / (sig(2) + sig(1)) * 2.5
    torch.testing.assert_close(out.weights[0], expected)
    s = torch.tensor([sig(0), sig(2), sig(1), sig(-1)])
    torch.testing.assert_close(out.probs[0], s / s.sum())


def test_the_bias_changes_the_choice_but_not_the_weights():
    r = _router()
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 is now chosen despite its low score
    out = r(torch.tensor([[0.0, 2.0, 1.0, -1.0]]))
    assert out.expert_ids.tolist() == [[3, 1]]
    torch.testing.assert_close(out.weights[0], torch.tensor([sig(-1), sig(2)]) / (sig(-1) + sig(2)))
    assert "expert_bias" not in dict(r.named_parameters())  # no optimizer ever moves it


def test_group_limited_selection_scores_a_group_by_its_two_best():
    # groups {0,1,2}, {3,4,5}: sums of top 2 are 0.9+0.8=1.7 and 0.95+0.1=1.05; group 0 wins
    scores = torch.tensor([[0.9, 0.8, 0.05, 0.95, 0.1, 0.05]])
    assert allowed_by_group(scores, 2, 1).tolist() == [[True, True, True, False, False, False]]
    r = SigmoidBiasRouter(MoEConfig(num_experts=6, top_k=2, hidden_dim=6, ffn_dim=4, router="sigmoid_bias",
                                    num_groups=2, topk_groups=1))
    with torch.no_grad():
        r.weight.copy_(torch.eye(6))
    logits = torch.logit(scores)
    assert r(logits).expert_ids.tolist() == [[0, 1]]  # expert 3 has the best score but its group lost
    r_free = SigmoidBiasRouter(MoEConfig(num_experts=6, top_k=2, hidden_dim=6, ffn_dim=4, router="sigmoid_bias"))
    with torch.no_grad():
        r_free.weight.copy_(torch.eye(6))
    assert r_free(logits).expert_ids.tolist() == [[3, 0]]


def test_the_bias_also_decides_which_group_wins():
    # same scores as above: group 0 wins on scores alone (1.7 vs 1.05)
    logits = torch.logit(torch.tensor([[0.9, 0.8, 0.05, 0.95, 0.1, 0.05]]))
    r = SigmoidBiasRouter(MoEConfig(num_experts=6, top_k=2, hidden_dim=6, ffn_dim=4, router="sigmoid_bias",
                                    num_groups=2, topk_groups=1))
    with torch.no_grad():
        r.weight.copy_(torch.eye(6))
        r.expert_bias.copy_(torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0]))  # negative: group 0 scores -0.3
    out = r(logits)
    assert out.expert_ids.tolist() == [[3, 4]]  # group 1 wins; its experts are chosen on s + b
    s3, s4 = 0.95, 0.1
    torch.testing.assert_close(out.weights[0], torch.tensor([s3, s4]) / (s3 + s4))  # weighted by s alone


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    routing = Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), logits.softmax(-1), logits)
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 3) ** 2) / 2
    assert router_z_loss(routing).item() == pytest.approx(expected, rel=1e-6)
    empty = Routing(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), torch.zeros(0, 2), torch.zeros(0, 2))
    assert router_z_loss(empty).item() == 0.0


def test_bias_update_moves_towards_the_underloaded_experts():
    r = _router()
    load = update_expert_bias(r, torch.tensor([10, 2, 4, 4]), rate=0.1)  # mean 5
    assert load.tolist() == [10, 2, 4, 4]
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    update_expert_bias(r, torch.tensor([5, 5, 5, 5]), rate=0.1)  # balanced: no change
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="rate"):
        update_expert_bias(r, torch.tensor([1, 1, 1, 1]), rate=-1.0)


def test_layer_reports_both_losses_with_the_deepseek_router():
    layer = MoELayer(MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, router="sigmoid_bias",
                               num_groups=4, topk_groups=1))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    y, aux = layer(x)
    assert y.shape == (10, 16) and aux.aux_loss.item() > 0 and aux.z_loss.item() > 0
    (y.sum() + aux.aux_loss + aux.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    groups = aux.routing.expert_ids // 2  # 4 groups of 2 experts, 1 kept per token
    assert (groups[:, 0] == groups[:, 1]).all()  # both of a token's experts are in its one group
    assert len(set(groups[:, 0].tolist())) > 1  # and tokens do pick different groups
