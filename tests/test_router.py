import math

import pytest
import torch

from lessons_lib import MoEConfig, Routing, TopKRouter, load_balancing_loss


def _router(norm=True):
    r = TopKRouter(MoEConfig(num_experts=3, top_k=2, hidden_dim=2, ffn_dim=4, norm_topk_prob=norm))
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    return r


def test_mixtral_semantics_on_a_hand_computed_case():
    # token x = [1, 2]: logits [1, 2, 3]; softmax = [e^1, e^2, e^3] / (e^1 + e^2 + e^3)
    r = _router()(torch.tensor([[1.0, 2.0]]))
    z = math.e + math.e**2 + math.e**3
    assert torch.allclose(r.probs, torch.tensor([[math.e / z, math.e**2 / z, math.e**3 / z]]))
    assert r.expert_ids.tolist() == [[2, 1]]
    # renormalized over the two kept: e^3/(e^2+e^3) and e^2/(e^2+e^3)
    expected = torch.tensor([[math.e**3, math.e**2]]) / (math.e**2 + math.e**3)
    assert torch.allclose(r.weights, expected)


def test_qwen_semantics_keep_the_raw_probabilities():
    r = _router(norm=False)(torch.tensor([[1.0, 2.0]]))
    z = math.e + math.e**2 + math.e**3
    assert torch.allclose(r.weights, torch.tensor([[math.e**3 / z, math.e**2 / z]]))
    assert r.weights.sum() < 1


def test_router_scores_in_fp32_for_a_bf16_layer():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=8, dtype="bfloat16")
    r = TopKRouter(cfg)(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.probs.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert r.expert_ids.shape == (5, 2)


def test_load_balancing_loss_hand_computed():
    # 2 tokens, E = 2, k = 1: both tokens to expert 0, mean probs P = [0.7, 0.3]
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    routing = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), probs, probs.log())
    # f = [1, 0]; loss = E * (1 * 0.7 + 0 * 0.3) = 1.4
    assert load_balancing_loss(routing, 2).item() == pytest.approx(1.4)


def test_load_balancing_loss_is_one_when_uniform_for_any_k():
    for k in (1, 2, 4):
        T, E = 16, 4
        probs = torch.full((T, E), 1 / E)
        ids = (torch.arange(T * k) % E).reshape(T, k)
        routing = Routing(ids, torch.full((T, k), 1 / k), probs, probs.log())
        assert load_balancing_loss(routing, E).item() == pytest.approx(1.0)


def test_load_balancing_gradient_lowers_the_overloaded_expert():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.5, 0.0]], requires_grad=True)
    probs = logits.softmax(-1)
    routing = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), probs, logits)
    load_balancing_loss(routing, 3).backward()
    # descending the gradient must lower expert 0's logit relative to the others
    assert logits.grad[:, 0].min() > 0 and (logits.grad[:, 1:] < 0).all()


def test_empty_batch():
    r = _router()(torch.zeros(0, 2))
    assert r.expert_ids.shape == (0, 2)
    loss = load_balancing_loss(r, 3)
    assert loss.item() == 0.0
