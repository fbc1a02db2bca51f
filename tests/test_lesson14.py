"""Lesson 14: the MoE transformer generates under EP what it generates on one device; decode's static path and
two micro-batches compute what the layer computes whole; the buffers' bill."""
import dataclasses

import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.decode_latency import static_buffer_bytes
from lessons_lib.model import KVCache, ModelConfig, MoETransformer, generate
from lessons_lib.moe.capacity import static_dropless
from lessons_lib.moe.static_decode import StaticDecode
from lessons_lib.moe.two_batch import two_batch_forward

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5
SMALL = ModelConfig(MoEConfig(num_experts=4, top_k=2, hidden_dim=32, ffn_dim=64, activation="swiglu",
                              shared_ffn_dim=16), vocab_size=64, max_seq_len=40)


@pytest.mark.parametrize("nproc", [2, 4])
def test_ep_generation_equals_single_device_and_the_other_paths_equal_the_whole_layer(nproc):
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "generation"}, stream=False,
                   timeout=900).value
    assert len(r["generation"]) == 3 * 3 * 2
    bad = [g for g in r["generation"] if not (g["same_ids"] and g["logits"] <= TOLERANCE)]
    assert not bad
    assert all(g["sequences"] == sum(1 + q % 3 for q in range(nproc)) for g in r["generation"])
    assert len(r["two_batch"]) == 6 * 2 and all(t["error"] <= TOLERANCE for t in r["two_batch"])
    assert len(r["static"]) == 6 and all(t["error"] <= TOLERANCE for t in r["static"])
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


@pytest.fixture
def one_rank():
    """A one-rank gloo group, torn down after the test (the static path needs the all-to-all dispatcher)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_static_decode_and_two_batches_on_one_rank(one_rank):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, shared_ffn_dim=8)
    layer = MoELayer(cfg, "alltoall", "grouped")
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = layer(x)[0]
    static = StaticDecode(MoELayer(static_dropless(cfg), "alltoall", "grouped"), 8)
    assert (static(x) - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert "counts" not in static.layer.dispatcher.traffic.phases  # its passes exchanged no counts
    assert not static.layer.dispatcher.fixed_sizes  # only during its own passes: called directly, counts as before
    static.layer(x)
    assert "counts" in static.layer.dispatcher.traffic.phases
    assert (two_batch_forward(layer, x) - whole).abs().max() <= 1e-5 * whole.abs().max()
    with pytest.raises(ValueError, match="tokens <= 8"):
        static(torch.randn(9, 16))
    with pytest.raises(ValueError, match="static shapes"):
        StaticDecode(layer, 4)  # dynamic shapes
    with pytest.raises(ValueError, match="static shapes"):
        StaticDecode(MoELayer(static_dropless(cfg), "allgather"), 4)
    capped = MoELayer(dataclasses.replace(static_dropless(cfg), capacity_factor=1.0), "alltoall")
    with pytest.raises(ValueError, match="could drop"):
        StaticDecode(capped, 8)  # C = k·T/E = 4 < 8
    with pytest.raises(ValueError, match="alltoall"):
        two_batch_forward(MoELayer(cfg, "local"), x)
    with pytest.raises(ValueError, match="dropless"):
        two_batch_forward(MoELayer(dataclasses.replace(cfg, capacity_factor=1.0), "alltoall"), x)
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        StaticDecode(MoELayer(static_dropless(cfg), "alltoall"), 0)


def test_static_decode_checks_the_hash_routers_ids_before_sending(one_rank):
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, router="hash")
    layer = MoELayer(cfg, "alltoall", "grouped")
    static = StaticDecode(MoELayer(static_dropless(cfg), "alltoall", "grouped"), 8)
    x, ids = torch.randn(5, 16), torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        assert (static(x, ids) - layer(x, token_ids=ids)[0]).abs().max() <= 1e-5
    for bad, words in ((None, "routes by token id"), (ids[:1], "routes by token id"),
                       (torch.tensor([3, 1, -4, 1, 5]), ">= 0")):
        with pytest.raises(ValueError, match=words):
            static(x, bad)


def test_static_buffers_are_sized_for_the_worst_case():
    ds = MoEConfig(num_experts=256, top_k=8, hidden_dim=7168, ffn_dim=2048)
    for N in (8, 64):
        b = static_buffer_bytes(ds, 128, N)
        assert b["rows"]["static_sent"] == b["rows"]["static_received"] == 256 * 128  # whatever N is
        assert b["rows"]["dynamic_balanced"] == 128 * 8
        assert b["bytes"]["static_received"] == 256 * 128 * 7168 * 2
    assert static_buffer_bytes(ds, 128, 64)["rows"]["dynamic_worst_received"] == 64 * 128 * 4  # min(k, L = 4)
    with pytest.raises(ValueError, match="divide"):
        static_buffer_bytes(ds, 128, 3)
