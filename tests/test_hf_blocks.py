"""Lesson 08's block against Hugging Face transformers' own: DeepSeek-V3 (routed + shared experts, sigmoid router
with groups) and Qwen2-MoE (softmax router, gated shared expert), loaded from the same random weights."""
import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.init import init_full_state_dict

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

E, K, H, F, S = 8, 2, 16, 32, 24


@torch.no_grad()
def load_hf_experts(experts, shared, sd):
    """Ours: w13 [E, H, 2F] (the gate's F columns, then the up projection's), w2 [E, F, H] (x @ w). Theirs:
    gate_up_proj [E, 2F, H] in the same order, down_proj [E, H, F] and nn.Linear weights [out, in] (x @ Wᵀ)."""
    experts.gate_up_proj.copy_(sd["experts.w13"].transpose(1, 2))
    experts.down_proj.copy_(sd["experts.w2"].transpose(1, 2))
    gate, up = sd["shared.w13"].chunk(2, dim=1)
    shared.gate_proj.weight.copy_(gate.T)
    shared.up_proj.weight.copy_(up.T)
    shared.down_proj.weight.copy_(sd["shared.w2"].T)


def assert_same_output(block, layer, seed):
    """Their block on [2, 24, H] and our layer on the same tokens flattened: equal within fp32 rounding."""
    x = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = block(x).view(-1, H)
    mine, _ = layer(x.view(-1, H))
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert theirs.abs().max() > 0.1  # not a comparison of zeros


def ours(cfg):
    sd = init_full_state_dict(cfg)
    layer = MoELayer(cfg)
    layer.load_full_state_dict(sd)
    return layer, sd


def test_deepseek_v3_moe_block():
    n_shared = 2
    hf_cfg = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=F, n_routed_experts=E,
                                           num_experts_per_tok=K, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                           norm_topk_prob=True, n_shared_experts=n_shared, hidden_act="silu",
                                           num_attention_heads=2, num_key_value_heads=2)
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_dim=H, ffn_dim=F, activation="swiglu", router="sigmoid_bias",
                    num_groups=4, topk_groups=2, routed_scaling_factor=2.5, shared_ffn_dim=n_shared * F)
    layer, sd = ours(cfg)
    block = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(sd["router.weight"])
        bias = torch.linspace(-0.05, 0.05, E)  # the balancing bias too, so that it changes the choice
        block.gate.e_score_correction_bias.copy_(bias)
        layer.router.expert_bias.copy_(bias)
    load_hf_experts(block.experts, block.shared_experts, sd)
    assert_same_output(block, layer, seed=0)


def test_qwen2_moe_block_with_its_gated_shared_expert():
    hf_cfg = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                                         norm_topk_prob=False, shared_expert_intermediate_size=S, hidden_act="silu",
                                         num_attention_heads=2, num_key_value_heads=2)
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_dim=H, ffn_dim=F, activation="swiglu", norm_topk_prob=False,
                    shared_ffn_dim=S, shared_gate=True)
    layer, sd = ours(cfg)
    block = Qwen2MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(sd["router.weight"])
        block.shared_expert_gate.weight.copy_(sd["shared.gate"])
    load_hf_experts(block.experts, block.shared_expert, sd)
    assert_same_output(block, layer, seed=1)
