"""Lesson 08: the DeepSeek-MoE block (shared experts); its overlap with the dispatch (lesson 09); the hash router
(lesson 06)."""
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
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "shared_block"}, stream=False,
                      timeout=600).value
    cases = 6 if nproc > 1 else 5  # routing_cases, + top_k=E below
    assert len(rows) == 3 * 2 * 5 * (cases + 1)
    assert {r["dispatcher"] for r in rows} == {"allgather", "alltoall", "tp"}
    gated = next(r for r in rows if r["case"].startswith("shared gated") and r["dispatcher"] == "alltoall")
    assert {"grad_shared.w13", "grad_shared.w2", "grad_shared.gate", "grad_router.weight"} \
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
        for dispatcher in ("allgather", "alltoall", "hierarchical"):
            for bad in ("missing", "shape"):
                msg = messages[f"{dispatcher}/{bad}"]
                assert ("token_ids" in msg) if rank == 1 else ("rank 1 of the expert-parallel group" in msg), msg
        assert "token_ids" in messages["tp/missing"] if rank == 1 else "tensor-parallel" in messages["tp/missing"]


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


def test_the_overlap_timeline_shows_the_shared_expert_beside_the_exchange_only_with_overlap():
    from lessons_lib.lab.overlap_timeline import PHASES, hidden_ms

    out = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "overlap_timeline"}, stream=False,
                     timeout=300).value
    t = out["times"]
    assert len(t["overlap_round_ms"]) == len(t["no_overlap_round_ms"]) == 2
    # the medians are of the rounds, each round's of its steps; the pair in turn is the exchange plus the shared
    # expert's forward, so it takes at least the exchange alone (a margin for this busy machine's noise)
    for key in ("overlap", "no_overlap"):
        rounds = sorted(t[f"{key}_round_ms"])
        assert rounds[0] <= t[f"{key}_ms"] <= rounds[-1] and rounds[0] > 0
    assert t["pair_in_turn_ms"] > 0.5 * t["dispatch_all_to_all_ms"] > 0
    assert t["saved_ms_range"][0] <= t["saved_ms"] <= t["saved_ms_range"][1]
    assert set(out["timeline"]) == {"overlap", "no overlap"}
    for setting, ranks in out["timeline"].items():
        assert len(ranks) == 2
        for bars in ranks:
            names = {b["name"] for b in bars if b["lane"] == "compute"}
            assert set(PHASES) | {"optimizer", "shared expert (backward)", "experts (backward)"} <= names, names
            assert {b["name"] for b in bars if b["lane"] == "communication"} == {"all-to-all"}
            assert all(b["end_ms"] >= b["start_ms"] for b in bars)
            if setting == "no overlap":  # blocking: nothing of the shared expert runs while rows travel
                assert hidden_ms(bars) < 1e-3, hidden_ms(bars)  # (a µs of clock skew between two threads)
    # gloo's thread moves the rows while this thread runs the shared expert (on some rank, at least)
    assert max(hidden_ms(bars) for bars in out["timeline"]["overlap"]) > 1e-3


def test_labelling_the_phases_changes_no_value():
    from lessons_lib.lab.overlap_timeline import label_phases

    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16, shared_ffn_dim=8, shared_gate=True)
    sd = init_full_state_dict(cfg)
    plain, labelled = MoELayer(cfg), label_phases(MoELayer(cfg))
    for layer in (plain, labelled):
        layer.load_full_state_dict(sd)
    x = torch.randn(10, 8)
    assert torch.equal(plain(x)[0], labelled(x)[0])
    assert type(labelled) is MoELayer and "route" in vars(labelled) and "route" not in vars(plain)  # instance only


def test_overlap_step_times_needs_a_shared_expert():
    from lessons_lib.lab.overlap_timeline import overlap_step_times

    with pytest.raises(ValueError, match="shared_ffn_dim"):
        overlap_step_times(MoEConfig(num_experts=4, top_k=2, hidden_dim=8, ffn_dim=16), 8)


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


def test_trace_bars_names_gpu_kernels_by_the_phase_that_launched_them():
    """A hand-made Chrome trace of the fields torch.profiler writes: the kernels' lanes, names and times."""
    from lessons_lib.lab.overlap_timeline import hidden_ms, streams_busy_ms, trace_bars

    def ev(name, cat, tid, ts, dur, **args):
        return {"ph": "X", "name": name, "cat": cat, "tid": tid, "ts": ts, "dur": dur, "args": args}

    main, autograd = 1, 2
    events = [
        ev("barrier", "user_annotation", main, 0, 100),
        ev("dispatch", "user_annotation", main, 100, 50),
        ev("shared expert", "user_annotation", main, 110, 20),
        ev("aten::mm", "cpu_op", main, 112, 5, **{"External id": 7, "Sequence number": 3}),
        ev("aten::index", "cpu_op", main, 102, 2, **{"External id": 5, "Sequence number": 2}),
        ev("autograd::engine::evaluate_function: MmBackward0", "cpu_op", autograd, 300, 10,
           **{"External id": 20, "Sequence number": 3}),
        ev("aten::mm", "cpu_op", autograd, 301, 5, **{"External id": 21}),
        ev("optimizer", "user_annotation", main, 400, 30),
        ev("gemm_kernel", "kernel", 30, 200, 40, **{"External id": 7, "stream": 20}),  # the shared expert's mm
        ev("index_kernel", "kernel", 30, 150, 10, **{"External id": 5, "stream": 7}),
        ev("ncclDevKernel_SendRecv", "kernel", 31, 190, 30, **{"External id": 99, "stream": 16}),
        ev("gemm_bwd_kernel", "kernel", 30, 320, 20, **{"External id": 21, "stream": 20}),
    ]
    bars = trace_bars(events)
    gpu = {(b["lane"], b["name"], b["start_ms"] * 1e3) for b in bars if b["lane"].startswith("stream")}
    assert gpu == {("stream 20", "shared expert", 100), ("stream 7", "dispatch", 50),
                   ("stream 16", "all-to-all", 90), ("stream 20", "shared expert (backward)", 220)}
    assert ("compute", "shared expert (backward)") in {(b["lane"], b["name"]) for b in bars}
    assert "barrier" not in {b["name"] for b in bars}
    # on a GPU the overlap is read from the kernels: NCCL's 90..120 us against the shared expert's 100..140 us
    assert abs(hidden_ms(bars) - 0.020) < 1e-9
    assert abs(streams_busy_ms(bars) - (0.010 + 0.050 + 0.020)) < 1e-9  # 50..60, 90..140, 220..240 us
