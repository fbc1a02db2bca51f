"""Lesson 14: the MoE transformer generates under EP what it generates on one device; its KV cache; where the expert
GEMMs turn compute-bound."""

import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig
from lessons_lib.model import KVCache, ModelConfig, MoETransformer, generate

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5
SMALL = ModelConfig(MoEConfig(num_experts=4, top_k=2, hidden_dim=32, ffn_dim=64, activation="swiglu",
                              shared_ffn_dim=16), vocab_size=64, max_seq_len=40)


@pytest.mark.parametrize("nproc", [2, 4])
def test_ep_generation_equals_single_device(nproc):
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "generation"}, stream=False,
                   timeout=900).value
    assert len(r["generation"]) == 3 * 3 * 2
    bad = [g for g in r["generation"] if not (g["same_ids"] and g["logits"] <= TOLERANCE)]
    assert not bad
    assert all(g["sequences"] == sum(1 + q % 3 for q in range(nproc)) for g in r["generation"])
    for rank_messages in r["bad_generate"]:  # every rank raised, the bad one with its reason
        assert all(m != "no error" for m in rank_messages.values())
    assert "max_seq_len" in r["bad_generate"][1]["too long"] and "vocab_size" in r["bad_generate"][1]["id out of range"]
    assert "another rank" in r["bad_generate"][0]["too long"]
    assert all("same number" in m["different new_tokens"] for m in r["bad_generate"])
    assert r["after_bad"] == 2 + 4


def test_the_kv_cache_gives_the_logits_of_the_whole_sequence():
    model = MoETransformer(SMALL)
    prompt = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    ids, logits = generate(model, prompt, 12)
    assert ids.shape == (3, 17) and logits.shape == (12, 3, 64)
    assert torch.equal(ids[:, :5], prompt) and torch.equal(ids[:, 5:], logits.argmax(-1).T)
    with torch.no_grad():
        whole = model(ids[:, :-1])[0]  # no cache: every position recomputed, causally
    assert (whole[:, 4:] - logits.transpose(0, 1)).abs().max() <= 1e-5 * whole.abs().max()
    # a wrong cache position changes the result: the test above can fail
    cache = KVCache.empty(SMALL, 3, 17, "cpu", torch.float32)
    with torch.no_grad():
        model(prompt, cache, 0)
        shifted = model(ids[:, 5:6], cache, start=6)[0][:, -1]
    assert (shifted - logits[1]).abs().max() > 1e-3


def test_attention_without_a_cache_is_causal_wherever_it_starts():
    from lessons_lib.model.transformer import attend
    q, k, v = (torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    y = attend(q, k, v)
    assert torch.equal(attend(q, k, v, start=3), y)
    changed = v.clone()
    changed[:, :, 3] += 1  # the last position's value: the first three queries must not see it
    assert torch.equal(attend(q, k, changed)[:, :, :3], y[:, :, :3]) and not torch.equal(attend(q, k, changed), y)


def test_the_model_is_the_same_on_every_build_and_its_blocks_differ():
    a, b = MoETransformer(SMALL), MoETransformer(SMALL, "local", "loop")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.moe.experts.w2"], sa["blocks.1.moe.experts.w2"])
    assert all(p.dtype == torch.bfloat16 for p in MoETransformer(
        ModelConfig(MoEConfig(num_experts=4, top_k=2, hidden_dim=32, ffn_dim=64, dtype="bfloat16"))).parameters())


def test_generate_refuses_bad_arguments_on_one_device():
    model = MoETransformer(SMALL)
    for prompt, n, words in ((torch.zeros(1, 39, dtype=torch.long), 2, "max_seq_len"),
                             (torch.full((1, 3), 64), 1, "vocab_size"), (torch.zeros(2, 0, dtype=torch.long), 1,
                                                                         "at least one"),
                             (torch.zeros(1, 3, dtype=torch.long), -1, "new_tokens")):
        with pytest.raises(ValueError, match=words):
            generate(model, prompt, n)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(MoEConfig(hidden_dim=30), num_heads=4)



def test_the_expert_gemms_turn_compute_bound_where_flops_per_byte_reach_the_ridge():
    from lessons_lib.lab.decode_latency import compute_bound_tokens

    assert compute_bound_tokens(256, 8, 8, 200.0) == 800  # 32 local experts: T·8/32 FLOPs per byte >= 200
    assert compute_bound_tokens(256, 8, 64, 200.0) == 100
    # 16 local experts, 2 rows a token: T·2/16 FLOPs per byte; a ridge of 17.1 needs 136.8 tokens, so 137
    assert compute_bound_tokens(64, 2, 4, 17.1) == 137 and compute_bound_tokens(64, 2, 4, 17.0) == 136
