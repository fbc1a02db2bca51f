"""Lesson 08: the DeepSeekMoE block: shared experts behind every dispatcher against one device (with lesson 06's
routers by token id), fine-grained segmentation's counts, distinct ranks per token, the GEMM record."""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.init import init_full_state_dict

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


# 2 and 4 ranks; one rank, where every exchange is a copy to itself, was left out for CI's time (216 cases, 40-130 s):
# test_lesson12 runs a shared expert behind every EP dispatcher at one rank
@pytest.mark.parametrize("nproc", [2, 4])
def test_shared_experts_and_routing_by_id_equal_the_single_device_layer(nproc):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "shared_block"}, stream=False,
                      timeout=600).value
    cases = 6  # routing_cases, + top_k=E below
    assert len(rows) == 3 * 2 * 6 * (cases + 1)
    assert {r["dispatcher"] for r in rows} == {"allgather", "alltoall", "tp"}
    gated = next(r for r in rows if r["case"].startswith("shared gated") and r["dispatcher"] == "alltoall")
    assert {"grad_shared.w13", "grad_shared.w2", "grad_shared.gate", "grad_router.weight"} \
        <= set(gated["errors"])
    hashed = next(r for r in rows if r["case"].startswith("hash:"))
    assert not any("router" in name for name in hashed["errors"])  # the hash router has no weight
    table = next(r for r in rows if r["case"].startswith("table, shared:"))
    assert "grad_router.weight" in table["errors"]  # lesson 06's table router: its gate learns
    bad = [(r["dispatcher"], r["experts"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad


def test_shared_expert_is_added_to_the_routed_output():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, activation="swiglu", shared_ffn_dim=12,
                    shared_gate=True)
    sd = init_full_state_dict(cfg)
    assert sd["shared.w13"].shape == (8, 24) and sd["shared.w2"].shape == (12, 8) and sd["shared.gate"].shape == (1, 8)
    layer = MoELayer(cfg)
    layer.load_full_state_dict(sd)
    routed_only = MoELayer(MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, activation="swiglu"))
    routed_only.load_full_state_dict({k: v for k, v in sd.items() if not k.startswith("shared.")})
    x = torch.randn(5, 8)
    shared = torch.sigmoid(x @ sd["shared.gate"].T) * (
        (torch.nn.functional.silu(x @ sd["shared.w13"][:, :12]) * (x @ sd["shared.w13"][:, 12:])) @ sd["shared.w2"])
    torch.testing.assert_close(layer(x)[0], routed_only(x)[0] + shared)
    with pytest.raises(ValueError, match="missing"):
        layer.load_full_state_dict({k: v for k, v in sd.items() if k != "shared.gate"})
    with pytest.raises(ValueError, match="unexpected"):
        routed_only.load_full_state_dict(sd)


@pytest.mark.parametrize("kwargs, match", [
    ({"shared_gate": True}, "shared_ffn_dim"),
    ({"shared_ffn_dim": 0}, "shared_ffn_dim"),
])
def test_config_refuses_inconsistent_lesson08_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_distinct_ranks_by_hand_and_the_formula_by_enumeration():
    import itertools
    import math

    from lessons_lib.lab.granularity import distinct_ranks, expected_distinct_ranks

    ids = torch.tensor([[0, 1], [0, 5], [2, 3], [5, 4]])  # 6 experts on 3 ranks: {0,1} {2,3} {4,5}
    assert distinct_ranks(ids, 6, 3).tolist() == [1, 2, 1, 1]
    assert distinct_ranks(ids, 6, 1).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="divisible"):
        distinct_ranks(ids, 6, 4)
    for E, k, N in ((6, 2, 3), (8, 3, 4), (8, 8, 2), (12, 1, 3)):
        combos = torch.tensor(list(itertools.combinations(range(E), k)))
        brute = distinct_ranks(combos, E, N).double().mean().item()
        assert math.isclose(expected_distinct_ranks(E, k, N), brute, rel_tol=1e-12), (E, k, N)


def test_segmentation_keeps_parameters_and_flops_and_the_hash_traffic_follows_the_formula():
    from lessons_lib.lab.granularity import segment, traffic_per_token

    coarse = MoEConfig(num_experts=32, top_k=1, hidden_dim=7168, ffn_dim=16384)
    v3 = segment(coarse, 8)
    assert (v3.num_experts, v3.ffn_dim, v3.top_k) == (256, 2048, 8)
    with pytest.raises(ValueError, match="divisor"):
        segment(coarse, 3)
    rows = traffic_per_token(coarse, 8, ms=(1, 2, 4, 8))
    assert {r["E_times_F"] for r in rows} == {32 * 16384} and {r["k_times_F"] for r in rows} == {16384}
    assert [r["bytes_row_per_expert"] for r in rows] == [m * 7168 * 2 for m in (1, 2, 4, 8)]
    assert rows[0]["distinct_ranks"] == 1.0
    for r in rows:
        assert abs(r["distinct_ranks"] - r["expected_distinct_ranks"]) < 0.03 * r["expected_distinct_ranks"], r
        assert r["bytes_row_per_rank"] <= r["bytes_row_per_expert"]


def test_the_committed_granularity_record_plots():
    import json

    import matplotlib

    matplotlib.use("Agg")
    from lessons_lib.lab.figures import IMAGES
    from lessons_lib.lab.granularity import plot_record

    record = json.loads((IMAGES / "granularity_1xh200.json").read_text())
    fig = plot_record(record)
    ok = [r for r in record["sweep"] if "error" not in r]
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()][:2] == [len(ok), len(ok)]


def test_segmentation_and_shared_experts_keep_the_counted_parameters_and_flops():
    """DeepSeekMoE's accounting, counted from real layers: parameters from their tensors, FLOPs by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from lessons_lib.lab.granularity import deepseekmoe

    def counted(sizes):
        layer = MoELayer(MoEConfig(num_experts=sizes["routed_experts"], top_k=sizes["top_k"], hidden_dim=32,
                                   ffn_dim=sizes["ffn_dim"], activation="swiglu",
                                   shared_ffn_dim=sizes["shared_ffn_dim"] or None))
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            layer(torch.randn(64, 32))
        per = {n: sum(v.values()) for n, v in flops.get_flop_counts().items()}
        params = sum(p.numel() for part in (layer.experts, layer.shared) if part is not None for p in part.parameters())
        return params, per["MoELayer.experts"] + per.get("MoELayer.shared", 0)

    coarse = counted(deepseekmoe(8, 128, 2, 1, 0))
    assert coarse == (8 * 3 * 32 * 128, 64 * 2 * 2 * 3 * 32 * 128)
    assert counted(deepseekmoe(8, 128, 2, 4, 0)) == coarse == counted(deepseekmoe(8, 128, 2, 4, 2))
    assert deepseekmoe(16, 4096, 2, 4, 1) == {"routed_experts": 63, "ffn_dim": 1024, "top_k": 7, "shared_experts": 1,
                                              "shared_ffn_dim": 1024, "activated": 8}
    with pytest.raises(ValueError, match="routed expert"):
        deepseekmoe(8, 128, 2, 1, 2)  # k = 2 leaves nothing to route once 2 are shared
