"""Lesson 10: EP across nodes, the hierarchical dispatcher against the single-device layer."""
import pytest

from launcher import run_script
from launcher.run import REPO

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


@pytest.mark.parametrize("nproc, ranks_per_node", [(4, 2), (8, 4), (8, 2), (4, 4), (4, 1)])
def test_hierarchical_dispatch_equals_the_single_device_layer(nproc, ranks_per_node):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "hierarchical",
                                                                   "ranks_per_node": ranks_per_node},
                      stream=False, timeout=600).value
    assert len(rows) == 2 * 3 * 8 + 2  # banks × configs × (6 routing cases + 2 node cases), + top_k=E, hash
    assert {"grad_experts.w1", "grad_router.weight", "grad_input", "output"} <= set(rows[0]["errors"])
    bad = [(r["experts"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad


@pytest.mark.parametrize("nproc, ranks_per_node", [(4, 2), (8, 2)])
def test_counted_inter_node_bytes_equal_the_model_exactly(nproc, ranks_per_node):
    every = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "hierarchical_traffic",
                                                                    "ranks_per_node": ranks_per_node},
                       stream=False, timeout=300).value
    for rank, result in enumerate(every):
        for name, r in result.items():
            sent, back, received, sent_back = r["hier"]
            # this rank's tokens cross once per (token, remote node) each way (the model counts them one token at a
            # time, in Python, apart from the dispatcher's code); what it forwarded goes back
            assert sent == back == r["hier_model"] and sent_back == received, (rank, name, r)
            assert r["flat"] == r["flat_model"], (rank, name, r)  # once per remote (token, slot)
            assert r["hier_model"] <= r["flat_model"]
            assert r["same_output"] < 1e-5
    assert max(r["node-limited M=1"]["max_nodes"] for r in every) == 1  # node-limited: one node per token
    assert max(r["softmax"]["max_nodes"] for r in every) > 1
    for name in ("softmax", "node-limited M=1"):  # flat combine: what crosses back is what crossed out
        assert sum(r[name]["flat_combine"] for r in every) == sum(r[name]["flat_model"] for r in every)
    for name in ("softmax", "node-limited M=1"):  # NVLink: what the forwarders fanned out is the model's, summed
        assert sum(r[name]["intra"] for r in every) == sum(r[name]["intra_model"] for r in every) > 0
    k, N = 4, len(every)
    for name in ("softmax", "node-limited M=1"):
        for r in every:  # beside each row, its k slots: an int64 id and an fp32 weight each; rows of 4·H bytes
            ph, H = r[name]["phases"], 16
            assert ph["metadata inter-node"] == r[name]["hier"][0] // (4 * H) * k * 12
            assert ph["metadata intra-node"] == r[name]["intra"] // (4 * H) * k * 12
            assert ph["counts"] == (N - 1) * 16 + (ranks_per_node - 1) * 8  # hop 1's sizes and codes, hop 2's sizes
        # a partial row goes back inside the node for every row that was forwarded there
        assert sum(r[name]["phases"]["combine intra-node"] for r in every) == sum(r[name]["intra"] for r in every)
    sent = sum(r["softmax"]["hier"][0] for r in every)
    assert sent == sum(r["softmax"]["hier"][2] for r in every) and sent > 0  # what leaves arrives
    assert sum(r["softmax"]["hier_model"] for r in every) < sum(r["softmax"]["flat_model"] for r in every)


def test_a_bad_topology_stops_every_rank_and_none_waits():
    """Each bad setup is a ValueError on every rank; a ranks_per_node that differs between ranks too (found by one
    all_gather every rank joins), where new_group would otherwise wait forever for ranks making other groups."""
    every = run_script(WORKER, nproc=4, backend="gloo", params={"mode": "hierarchical_bad_setup"}, stream=False,
                       timeout=120).value
    assert len(every) == 4
    for rank_result in every:
        assert "must be a positive divisor of the world size (4)" in rank_result["R=3"]
        assert "positive divisor" in rank_result["R=0"]
        assert "ranks_per_node is for dispatcher 'hierarchical'" in rank_result["R for alltoall"]
        assert "leave group=None" in rank_result["a group"]
        assert "dropless" in rank_result["capacity"]
        for name in ("R differs", "LOCAL_WORLD_SIZE differs"):
            assert "ranks_per_node differs between ranks" in rank_result[name], rank_result[name]
        assert "[1, 1, 1, 2]" in rank_result["LOCAL_WORLD_SIZE differs"]


def test_node_traffic_by_hand():
    import torch

    from lessons_lib.lab.node_traffic import nodes_per_token, remote_nodes, remote_pairs, split_bytes_by_link

    ids = torch.tensor([[0, 1, 2], [4, 5, 7], [0, 6, 7]])  # 8 experts on 2 nodes: {0..3} {4..7}
    assert nodes_per_token(ids, 8, 2).tolist() == [1, 1, 2]
    assert remote_pairs(ids, 8, 2, node=0) == 0 + 3 + 2
    assert remote_nodes(ids, 8, 2, node=0) == 0 + 1 + 1
    assert remote_pairs(ids, 8, 2, node=1) == 3 + 0 + 1 and remote_nodes(ids, 8, 2, node=1) == 2
    # rank 1 of 4 ranks as 2 × 2: rank 0 shares its node, ranks 2 and 3 do not; its own rows stay put
    assert split_bytes_by_link([3, 9, 2, 5], rank=1, ranks_per_node=2, row_bytes=10) == {"intra-node": 30,
                                                                                         "inter-node": 70}
    with pytest.raises(ValueError, match="divisible"):
        remote_pairs(ids, 8, 3, node=0)


def test_rows_by_link_and_the_time_model_by_hand():
    import torch

    from lessons_lib.lab.node_traffic import layer_time_us, rows_by_link, tp_time_us

    # 8 experts on 2 nodes × 2 ranks (2 each); rank 1 is node 0's second rank
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    rows = rows_by_link(ids, 8, nodes=2, ranks_per_node=2, rank=1)
    # token 0 stays on node 0: flat sends rank 0 its 2 experts' rows over NVLink, hierarchical one row that rank 0
    # expands itself; token 1's 4 experts are all on node 1: flat sends 4 rows over the network, hierarchical 1,
    # which rank 3 forwards once to rank 2 (one row for its 2 experts)
    assert rows == {"flat": {"inter-node": 4, "intra-node": 2}, "hierarchical": {"inter-node": 1, "intra-node": 2}}
    # a token whose experts are on 3 ranks of one remote node of 4 ranks: one row over the network, then one row to
    # each of the 2 ranks that are not the receiver (local rank 1 receives it and keeps its own slots)
    rows = rows_by_link(torch.tensor([[8, 9, 10, 12]]), 16, nodes=2, ranks_per_node=4, rank=1)
    assert rows["hierarchical"] == {"inter-node": 1, "intra-node": 2} and rows["flat"]["inter-node"] == 4
    # 1 row of 1000 bf16 elements = 2000 bytes: at 50 GB/s 40 ns, at 500 GB/s 4 ns; dispatch + combine
    assert layer_time_us({"inter-node": 1, "intra-node": 1}, 1000, 2, 500.0, 50.0) == pytest.approx(0.088)
    assert layer_time_us({"inter-node": 1, "intra-node": 1}, 1000, 2, 500.0, 50.0, overlapped=True) == \
        pytest.approx(0.080)
    # the dispatch in FP8 (1.03125 bytes a value), the combine in bf16: 20.625 + 40 ns over the network
    assert layer_time_us({"inter-node": 1, "intra-node": 0}, 1000, 2, 500.0, 50.0,
                         dispatch_bytes_per_element=1.03125) == pytest.approx(0.060625)
    assert tp_time_us(1000, 1000, 2, 2, 50.0) == pytest.approx(2 * 0.5 * 2e6 / 50 / 1e3)
