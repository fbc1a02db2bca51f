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
