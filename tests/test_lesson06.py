"""Lesson 06's routers by token id: Roller et al.'s random hash (router="hash") and DeepSeek-V4's table
(router="table"), against transformers' DeepseekV4HashRouter; their balance on uniform and Zipf streams; a bad id
stops every rank. (Both routers behind every dispatcher, against one device: tests/test_lesson08.py's block cases.)"""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.hash_router import balanced_table, expert_hash

WORKER = REPO / "tests" / "ep_worker.py"


def test_hash_router_picks_k_distinct_fixed_experts_with_equal_weights():
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_dim=8, ffn_dim=8, router="hash")
    layer = MoELayer(cfg)
    ids = torch.tensor([3, 3, 70, 12345, 0])
    _, aux = layer(torch.randn(5, 8), token_ids=ids)
    e = aux.routing.expert_ids
    assert torch.equal(e[0], e[1])  # the same id, the same experts, whatever the input
    assert all(len(set(row.tolist())) == 4 for row in e)
    assert torch.equal(aux.routing.weights, torch.full((5, 4), 0.25))
    assert aux.aux_loss.item() == 0.0 and aux.z_loss.item() == 0.0 and list(layer.router.parameters()) == []
    _, again = MoELayer(cfg)(torch.randn(5, 8), token_ids=ids)
    assert torch.equal(again.routing.expert_ids, e)  # a fixed function of the id
    for bad, match in ((None, "token_ids=ids"), (torch.tensor([1, 2]), r"tokens=5"),
                       (torch.tensor([1.0] * 5), "integer"), (torch.tensor([1, 2, 3, 4, -1]), ">= 0")):
        with pytest.raises(ValueError, match=match):
            layer(torch.randn(5, 8), token_ids=bad)


def test_hash_routing_is_balanced_over_uniform_ids():
    load = torch.bincount(expert_hash(torch.arange(64_000), 64, 0).topk(8).indices.flatten(), minlength=64).float()
    assert load.max() / load.mean() < 1.05 and load.min() / load.mean() > 0.95


def test_hash_routing_is_unbalanced_on_a_zipf_stream_where_a_counted_table_and_the_bias_router_are_not():
    from lessons_lib.lab.hash_balance import expert_load_balance

    cfg = MoEConfig(num_experts=32, top_k=4, hidden_dim=32, ffn_dim=32, router="sigmoid_bias")
    run = dict(vocab=8000, tokens=4096, steps=20, bias_rate=1e-2, count_tokens=200_000)
    uniform = expert_load_balance(cfg, zipf_s=None, **run)
    zipf = expert_load_balance(cfg, zipf_s=1.0, **run)
    assert uniform["hash"] < 1.15, uniform  # balanced by construction, up to sampling noise
    assert zipf["hash"] > 1.4 * uniform["hash"], (uniform, zipf)  # the frequent ids' experts are hot
    assert zipf["sigmoid_bias"] < zipf["hash"], zipf
    assert zipf["balanced table"] < 1.2, zipf  # a table built from counts spreads the frequent ids
    # ... as far as a table can: one id's tokens all go to its own k experts, so an id more frequent than an
    # expert's fair share k/E overloads them whatever the table (at s = 1.2 the first id has about 22%, k/E 12.5%)
    steep = expert_load_balance(cfg, zipf_s=1.2, **run)
    p = 1.0 / torch.arange(1, 8001, dtype=torch.float64) ** 1.2
    floor = (p[0] / p.sum()).item() / (4 / 32)
    assert floor > 1.5 and steep["balanced table"] > 0.9 * floor, (floor, steep)


def test_missing_token_ids_on_one_rank_stop_every_rank():
    every = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "hash_bad_ids"}, stream=False,
                       timeout=300).value
    for rank, messages in enumerate(every):
        for dispatcher in ("allgather", "alltoall", "hierarchical"):
            for bad in ("missing", "shape"):
                msg = messages[f"{dispatcher}/{bad}"]
                assert ("token_ids" in msg) if rank == 1 else ("rank 1 of the expert-parallel group" in msg), msg
        assert "token_ids" in messages["tp/missing"] if rank == 1 else "tensor-parallel" in messages["tp/missing"]


def test_the_table_router_is_deepseek_v4s_hash_router():
    """The same gate and table in transformers' DeepseekV4HashRouter: the same experts, the same weights."""
    v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")  # transformers 5.23 has it
    DeepseekV4Config, DeepseekV4HashRouter = v4.DeepseekV4Config, v4.DeepseekV4HashRouter

    cfg = MoEConfig(num_experts=16, top_k=4, hidden_dim=32, ffn_dim=8, router="table", vocab_size=500,
                    routed_scaling_factor=1.5, seed=3)
    layer = MoELayer(cfg)
    counts = torch.randint(1, 100, (500,), generator=torch.Generator().manual_seed(0))
    layer.router.tid2eid.copy_(balanced_table(counts, 16, 4))  # a table other than the default
    hf = DeepseekV4HashRouter(DeepseekV4Config(vocab_size=500, hidden_size=32, num_local_experts=16,
                                               num_experts_per_tok=4, scoring_func="sqrtsoftplus",
                                               routed_scaling_factor=1.5))
    with torch.no_grad():
        hf.weight.copy_(layer.router.weight)
        hf.tid2eid.copy_(layer.router.tid2eid)
    x, ids = torch.randn(40, 32), torch.randint(500, (40,))
    _, hf_weights, hf_ids = hf(x, ids)
    routing = layer.route(x, ids)
    assert torch.equal(routing.expert_ids, hf_ids)
    torch.testing.assert_close(routing.weights, hf_weights, rtol=1e-6, atol=1e-7)
    # and a different gate gives different weights for the same experts: the comparison can fail
    with torch.no_grad():
        hf.weight.mul_(2.0)
    assert not torch.allclose(hf(x, ids)[1], routing.weights, atol=1e-4)


def test_the_table_router_weights_come_from_the_gate_and_need_the_ids():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=8, router="table", vocab_size=100)
    layer = MoELayer(cfg)
    ids = torch.tensor([5, 5, 99])
    x = torch.randn(3, 16)
    y, aux = layer(x, token_ids=ids)
    assert torch.equal(aux.routing.expert_ids, expert_hash(ids, 8, 0).topk(2).indices)  # the default table
    scores = torch.nn.functional.softplus(x @ layer.router.weight.T).sqrt().gather(1, aux.routing.expert_ids)
    torch.testing.assert_close(aux.routing.weights, scores / scores.sum(-1, keepdim=True))
    assert aux.aux_loss.item() == 0.0 and aux.z_loss.item() == 0.0  # nothing to balance by gradient
    y.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0  # the gate learns, the table does not
    assert "router.tid2eid" in layer.state_dict() and not layer.router.tid2eid.requires_grad
    for bad, match in ((None, "token_ids=ids"), (torch.tensor([1, 2, 100]), "vocab_size=100"),
                       (torch.tensor([1, -2, 3]), ">= 0")):
        with pytest.raises(ValueError, match=match):
            layer(x, token_ids=bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"router": "table"}, "vocab_size"),
    ({"router": "hash", "vocab_size": 10}, "vocab_size"),
    ({"router": "table", "vocab_size": 0}, "vocab_size"),
    ({"router": "hash", "routed_scaling_factor": 2.0}, "routed_scaling_factor"),
    ({"router": "table", "vocab_size": 10, "num_groups": 2}, "sigmoid_bias"),
])
def test_config_refuses_inconsistent_routing_by_id(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_balanced_table_gives_the_most_frequent_ids_the_least_loaded_experts():
    counts = torch.tensor([1.0, 100.0, 50.0, 30.0, 30.0, 5.0])  # id 1 is the most frequent
    table = balanced_table(counts, 4, 2)
    assert table[1].tolist() == [0, 1]  # first, every expert empty: the lowest ids
    assert table[2].tolist() == [2, 3]  # then the two still empty
    assert table[3].tolist() == table[4].tolist() == [2, 3]  # 50 and then 80 are still below the first two's 100
    assert table[5].tolist() == [0, 1]  # now 100 < 110
    load = torch.zeros(4).index_add_(0, table.flatten(), counts.repeat_interleave(2))
    assert load.max() / load.mean() < 1.1
    assert all(len(set(row)) == 2 for row in table.tolist())  # k distinct experts per id


def test_a_loaded_table_is_checked_and_unseen_ids_spread(one_rank):
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=8, router="table", vocab_size=50)
    from lessons_lib.moe.init import init_full_state_dict

    sd = init_full_state_dict(cfg)
    layer = MoELayer(cfg)
    for bad, match in ((sd["router.tid2eid"].clone().fill_(9), "outside"),
                       (torch.zeros(50, 2, dtype=torch.long), "same expert twice"),
                       (sd["router.tid2eid"][:10], "shape|must have shape")):
        with pytest.raises(ValueError, match=match):
            layer.load_full_state_dict({**sd, "router.tid2eid": bad})
    table = balanced_table(torch.zeros(40), 8, 2)  # nothing seen: the ids still spread over every expert
    assert torch.bincount(table.flatten(), minlength=8).tolist() == [10] * 8
    # with a placement (lesson 11) the slots route like experts, and the table router's config is set aside there
    from lessons_lib.moe.placement import contiguous_placement

    placed = MoELayer(cfg, "alltoall", placement=contiguous_placement(8, 1))
    y, _ = placed(torch.randn(5, 16), token_ids=torch.arange(5))
    assert y.shape == (5, 16)


def test_the_model_refuses_a_table_smaller_than_its_vocabulary():
    from lessons_lib.model import ModelConfig

    moe = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=8, router="table", vocab_size=32)
    with pytest.raises(ValueError, match="every token id needs a row"):
        ModelConfig(moe, vocab_size=64)
    ModelConfig(moe, vocab_size=32)


def test_hash_balance_takes_a_deepseek_v3_config():
    from lessons_lib.lab.hash_balance import expert_load_balance

    v3 = MoEConfig(num_experts=16, top_k=4, hidden_dim=16, ffn_dim=8, router="sigmoid_bias", num_groups=4,
                   topk_groups=2, routed_scaling_factor=2.5)
    out = expert_load_balance(v3, vocab=500, zipf_s=1.0, tokens=256, steps=2, count_tokens=1000)
    assert set(out) == {"hash", "balanced table", "sigmoid_bias"} and all(v >= 1.0 for v in out.values())
