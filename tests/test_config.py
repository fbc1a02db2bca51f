import pytest
import torch

from lessons_lib import MoEConfig


def test_defaults_and_dtype_names():
    cfg = MoEConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.activation, cfg.torch_dtype) == (8, 2, "gelu", torch.float32)
    assert MoEConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    assert MoEConfig(dtype="float16").torch_dtype == torch.float16


@pytest.mark.parametrize("field, value, words", [
    ("top_k", 0, ["top_k"]),
    ("top_k", 9, ["top_k", "1..8"]),
    ("num_experts", 0, ["num_experts", "positive"]),
    ("hidden_dim", -4, ["hidden_dim"]),
    ("ffn_dim", 2.5, ["ffn_dim"]),
    ("activation", "relu", ["activation", "gelu", "swiglu"]),
    ("router", "sinkhorn", ["router", "softmax_topk"]),
    ("dtype", "float64", ["dtype", "bfloat16", "float32"]),
    ("norm_topk_prob", "yes", ["norm_topk_prob"]),
    ("seed", -1, ["seed"]),
])
def test_bad_fields_name_the_field_and_the_allowed_values(field, value, words):
    with pytest.raises(ValueError) as e:
        MoEConfig(**{field: value})
    for w in words:
        assert w in str(e.value)


def test_top_k_equal_to_num_experts_is_allowed():
    assert MoEConfig(num_experts=4, top_k=4).top_k == 4


DEEPSEEK = dict(router="sigmoid_bias", num_experts=8, top_k=2)


@pytest.mark.parametrize("kw, words", [
    (dict(capacity_factor=0), ["capacity_factor", "> 0"]),
    (dict(capacity_factor=-0.5), ["capacity_factor"]),
    (dict(capacity_factor=float("nan")), ["capacity_factor"]),
    (dict(capacity_factor=True), ["capacity_factor"]),
    (dict(drop_policy="random"), ["drop_policy", "position", "probs"]),
    (dict(pad_to_capacity=True), ["pad_to_capacity", "capacity_factor"]),
    (dict(capacity_factor=1.0, pad_to_capacity="yes"), ["pad_to_capacity"]),
    (dict(DEEPSEEK, num_groups=3), ["num_groups", "divide", "num_experts"]),
    (dict(DEEPSEEK, num_groups=4, topk_groups=5), ["topk_groups", "1..4"]),
    (dict(DEEPSEEK, num_groups=4, topk_groups=0), ["topk_groups"]),
    (dict(DEEPSEEK, top_k=4, num_groups=4, topk_groups=1), ["topk_groups", "top_k"]),
    (dict(DEEPSEEK, routed_scaling_factor=0.0), ["routed_scaling_factor"]),
    (dict(num_groups=2), ["num_groups", "sigmoid_bias"]),
    (dict(routed_scaling_factor=2.5), ["routed_scaling_factor", "sigmoid_bias"]),
])
def test_bad_capacity_and_routing_options_name_the_field(kw, words):
    with pytest.raises(ValueError) as e:
        MoEConfig(**kw)
    for w in words:
        assert w in str(e.value)


def test_good_capacity_and_routing_options():
    cfg = MoEConfig(**DEEPSEEK, num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                    capacity_factor=1.25, drop_policy="position", pad_to_capacity=True)
    assert (cfg.num_groups, cfg.topk_groups, cfg.capacity_factor) == (4, 2, 1.25)
