"""Lesson 08: shared experts, their overlap with the dispatch, and the hash router."""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.hash_router import expert_hash
from lessons_lib.moe.init import init_full_state_dict

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_shared_experts_and_hash_routing_equal_the_single_device_layer(nproc):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "lesson08"}, stream=False,
                      timeout=600).value
    cases = 6 if nproc > 1 else 5  # routing_cases, + top_k=E below
    assert len(rows) == 3 * 2 * 5 * (cases + 1)
    assert {r["dispatcher"] for r in rows} == {"allgather", "alltoall", "tp"}
    gated = next(r for r in rows if r["case"].startswith("shared gated") and r["dispatcher"] == "alltoall")
    assert {"grad_shared.w1", "grad_shared.w2", "grad_shared.w3", "grad_shared.gate", "grad_router.weight"} \
        <= set(gated["errors"])
    hashed = next(r for r in rows if r["case"].startswith("hash:"))
    assert not any("router" in name for name in hashed["errors"])  # the hash router has no weight
    bad = [(r["dispatcher"], r["experts"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad


def test_overlapping_the_shared_expert_changes_no_bit():
    every = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "overlap_bitwise"}, stream=False,
                       timeout=300).value
    assert every == [{"alltoall/loop": True, "alltoall/grouped": True, "allgather/loop": True,
                      "allgather/grouped": True, "alltoall/hash": True}] * 2


def test_missing_token_ids_on_one_rank_stop_every_rank():
    every = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "hash_bad_ids"}, stream=False,
                       timeout=300).value
    for rank, messages in enumerate(every):
        for dispatcher in ("allgather", "alltoall"):
            for bad in ("missing", "shape"):
                msg = messages[f"{dispatcher}/{bad}"]
                assert ("token_ids" in msg) if rank == 1 else ("rank 1 of the expert-parallel group" in msg), msg
        assert "token_ids" in messages["tp/missing"] if rank == 1 else "tensor-parallel" in messages["tp/missing"]


def test_shared_expert_is_added_to_the_routed_output():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, activation="swiglu", shared_ffn_dim=12,
                    shared_gate=True)
    sd = init_full_state_dict(cfg)
    assert sd["shared.w1"].shape == (8, 12) and sd["shared.w2"].shape == (12, 8) and sd["shared.gate"].shape == (1, 8)
    layer = MoELayer(cfg)
    layer.load_full_state_dict(sd)
    routed_only = MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, activation="swiglu"))
    routed_only.load_full_state_dict({k: v for k, v in sd.items() if not k.startswith("shared.")})
    x = torch.randn(5, 8)
    shared = torch.sigmoid(x @ sd["shared.gate"].T) * (
        (torch.nn.functional.silu(x @ sd["shared.w1"]) * (x @ sd["shared.w3"])) @ sd["shared.w2"])
    torch.testing.assert_close(layer(x)[0], routed_only(x)[0] + shared)
    with pytest.raises(ValueError, match="missing"):
        layer.load_full_state_dict({k: v for k, v in sd.items() if k != "shared.gate"})
    with pytest.raises(ValueError, match="unexpected"):
        routed_only.load_full_state_dict(sd)


@pytest.mark.parametrize("kwargs, match", [
    ({"shared_gate": True}, "shared_ffn_dim"),
    ({"shared_ffn_dim": 0}, "shared_ffn_dim"),
    ({"router": "hash", "routed_scaling_factor": 2.0}, "sigmoid_bias"),
])
def test_config_refuses_inconsistent_lesson08_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


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


def test_hash_routing_is_unbalanced_on_a_zipf_stream_where_the_bias_router_adapts():
    from lessons_lib.lab.hash_balance import expert_load_balance

    cfg = MoEConfig(num_experts=32, top_k=4, hidden_dim=32, ffn_dim=32, router="sigmoid_bias")
    uniform = expert_load_balance(cfg, vocab=8000, zipf_s=None, tokens=4096, steps=20, bias_rate=1e-2)
    zipf = expert_load_balance(cfg, vocab=8000, zipf_s=1.2, tokens=4096, steps=20, bias_rate=1e-2)
    assert uniform["hash"] < 1.15, uniform  # balanced by construction, up to sampling noise
    assert zipf["hash"] > 2.0, zipf  # the frequent ids' experts are hot
    assert zipf["sigmoid_bias"] < zipf["hash"], zipf
