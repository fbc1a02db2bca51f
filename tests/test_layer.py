import pytest
import torch
import torch.nn.functional as F

from lessons_lib import MoEConfig, MoELayer, init_full_state_dict


def reference_moe(x, sd, cfg):
    """The layer's definition, token by token, straight from the unsharded weights."""
    probs = (x @ sd["router.weight"].T).softmax(-1)
    weights, ids = probs.topk(cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(cfg.hidden_dim)
        for e, w in zip(ids[t].tolist(), weights[t]):
            if cfg.activation == "swiglu":  # w13 [E, H, 2F]: the gate's F columns, then the up projection's
                gate, up = sd["experts.w13"][e].split(cfg.ffn_dim, dim=-1)
                h = F.silu(x[t] @ gate) * (x[t] @ up)
            else:
                h = F.gelu(x[t] @ sd["experts.w1"][e])
            acc = acc + w * (h @ sd["experts.w2"][e])
        out.append(acc)
    return torch.stack(out) if out else x.new_zeros(0, cfg.hidden_dim)


CASES = [dict(activation="gelu"), dict(activation="swiglu"), dict(norm_topk_prob=False),
         dict(top_k=1), dict(top_k=6, num_experts=6)]


@pytest.mark.parametrize("opts", CASES)
def test_layer_equals_definition_in_outputs_and_gradients(opts):
    cfg = MoEConfig(**{**dict(num_experts=6, top_k=2, hidden_dim=8, ffn_dim=16, seed=1), **opts})
    layer = MoELayer(cfg)
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))

    x1 = x.clone().requires_grad_()
    y, aux = layer(x1)
    (y * g).sum().backward()

    sd = {k: v.clone().requires_grad_() for k, v in init_full_state_dict(cfg).items()}
    x2 = x.clone().requires_grad_()
    y_ref = reference_moe(x2, sd, cfg)
    (y_ref * g).sum().backward()

    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.router.weight.grad, sd["router.weight"].grad, rtol=1e-5, atol=1e-6)
    for name, p in layer.experts.named_parameters():
        assert torch.allclose(p.grad, sd[f"experts.{name}"].grad, rtol=1e-5, atol=1e-6), name
    assert aux.tokens_per_expert.sum().item() == 20 * cfg.top_k


def test_every_token_to_one_expert():
    cfg = MoEConfig(num_experts=4, top_k=1, hidden_dim=8, ffn_dim=8)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 100.0
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1.0  # the steered feature: expert 2 wins every token by a logit margin of 100
    y, aux = layer(x)
    assert aux.tokens_per_expert.tolist() == [0, 0, 10, 0]
    assert torch.allclose(y, reference_moe(x, {"router.weight": layer.router.weight, "experts.w1": layer.experts.w1,
                                                "experts.w2": layer.experts.w2}, cfg), atol=1e-6)
    assert aux.aux_loss.item() > 3.9  # E · 1 · P_2 with P_2 ≈ 1


def test_empty_input_and_backward():
    layer = MoELayer(MoEConfig(hidden_dim=8, ffn_dim=8))
    x = torch.zeros(0, 8, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 8)
    (y.sum() + aux.aux_loss).backward()


def test_bf16_layer_runs_and_stays_close_to_fp32():
    cfg32 = MoEConfig(num_experts=4, hidden_dim=16, ffn_dim=32)
    cfg16 = MoEConfig(num_experts=4, hidden_dim=16, ffn_dim=32, dtype="bfloat16")
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))  # no near-tie in routing
    y32, _ = MoELayer(cfg32)(x)
    y16, _ = MoELayer(cfg16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_load_full_state_dict_roundtrip_and_errors():
    cfg = MoEConfig(num_experts=4, hidden_dim=8, ffn_dim=8, activation="swiglu", seed=0)
    other = init_full_state_dict(MoEConfig(num_experts=4, hidden_dim=8, ffn_dim=8, activation="swiglu", seed=9))
    layer = MoELayer(cfg)
    layer.load_full_state_dict(other)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x)[0], MoELayer(MoEConfig(**{**cfg.__dict__, "seed": 9}))(x)[0])
    with pytest.raises(ValueError, match="missing"):
        layer.load_full_state_dict({k: v for k, v in other.items() if k != "experts.w2"})
    with pytest.raises(ValueError, match=r"experts.w13 must have shape \[4, 8, 16\]"):
        layer.load_full_state_dict({**other, "experts.w13": torch.zeros(4, 8, 9)})


def test_bad_input_and_names():
    cfg = MoEConfig(hidden_dim=8, ffn_dim=8)
    layer = MoELayer(cfg)
    with pytest.raises(ValueError, match="hidden_dim=8"):
        layer(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="dispatcher must be one of .*local"):
        MoELayer(cfg, dispatcher="nope")
    with pytest.raises(ValueError, match="experts must be one of .*loop"):
        MoELayer(cfg, experts="nope")
    with pytest.raises(ValueError, match="takes no process group"):
        MoELayer(cfg, group=object())


def test_rank_and_size_needs_an_initialized_process_group():
    from lessons_lib import rank_and_size

    with pytest.raises(RuntimeError, match="not initialized"):
        rank_and_size()


def test_count_per_expert_matches_bincount_and_takes_a_mask():
    from lessons_lib.moe.router import count_per_expert

    ids = torch.tensor([3, 0, 3, 1, 3])
    assert count_per_expert(ids, 5).tolist() == torch.bincount(ids, minlength=5).tolist() == [1, 1, 0, 3, 0]
    assert count_per_expert(ids, 5, mask=torch.tensor([True, False, True, True, False])).tolist() == [0, 1, 0, 2, 0]


def test_permute_sends_each_gradient_back_to_its_row():
    from lessons_lib.moe.dispatch_local import Permute, inverse_permutation

    x = torch.randn(5, 3, requires_grad=True)
    order = torch.tensor([2, 0, 4, 1, 3])
    assert inverse_permutation(order).tolist() == [1, 3, 0, 4, 2]
    g = torch.randn(5, 3)
    Permute.apply(x, order, inverse_permutation(order)).backward(g)
    x2 = x.detach().clone().requires_grad_()
    x2[order].backward(g)
    assert torch.equal(Permute.apply(x, order, inverse_permutation(order)), x[order]) and torch.equal(x.grad, x2.grad)


def test_the_local_dispatcher_meets_the_dispatcher_contract():
    from lessons_lib import Dispatcher, DispatchState

    layer = MoELayer(MoEConfig())
    assert isinstance(layer.dispatcher, Dispatcher)
    _, _, state = layer.dispatch(torch.randn(4, 64), layer.route(torch.randn(4, 64)))
    assert isinstance(state, DispatchState) and state.sizes is None
