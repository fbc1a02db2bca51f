"""Lesson 11: a layer with redundant experts computes what the single-device layer computes, and trains alike."""
import pytest

from launcher import run_script
from launcher.run import REPO

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5


@pytest.mark.parametrize("nproc", [2, 4])
def test_replicas_equal_the_single_device_layer(nproc):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "placement"}, stream=False,
                      timeout=600).value
    assert len(rows) == 2 * 2 * 6  # banks × activations × (5 cases + a rank with only copies)
    assert {"grad_experts.w1", "grad_experts.w2", "grad_router.weight", "grad_input"} <= set(rows[0]["errors"])
    bad = [(r["experts"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad


def test_training_with_a_placement_and_a_move_halfway_equals_training_without():
    r = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "placement_training"}, stream=False,
                   timeout=300).value
    assert r["moved"] and r["steps"] == 20
    assert r["worst_weight"] <= TOLERANCE and r["loss_diff"] <= 1e-6, r


@pytest.mark.parametrize("nproc, ranks_per_node", [(4, 2), (8, 4)])
def test_replicas_behind_the_hierarchical_dispatcher_equal_the_single_device_layer(nproc, ranks_per_node):
    """Lesson 11 behind lesson 10's dispatcher, on 2 nodes × 2 and 2 × 4 ranks: outputs and the gradients of the
    input, the router and every logical expert (summed over its replicas) for a node-aware placement, one whose
    groups changed nodes and one with replicas on several nodes; then 20 SGD steps moved from the first to the
    second halfway, against the same run without replicas."""
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "placement_hierarchical",
                                                                 "ranks_per_node": ranks_per_node},
                   stream=False, timeout=600).value
    rows = r["rows"]
    assert len(rows) == 3 * (3 * 4 + 1)  # placements × (configs × routings + the loop bank)
    checked = {"output", "grad_input", "grad_router.weight", "grad_experts.w1", "grad_experts.w2"}
    assert checked <= set(rows[0]["errors"])
    bad = [(row["experts"], row["case"], row["errors"]) for row in rows
           if not all(e <= TOLERANCE for e in row["errors"].values())]
    assert not bad
    t = r["training"]
    assert t["moved"] and t["steps"] == 20
    assert t["worst_weight"] <= TOLERANCE and t["loss_diff"] <= 1e-6, t
    # node-limited routing (one group a token): one node a token while every expert lives on one node, whichever
    # node that is; replicas spread over nodes send some token to two
    assert r["nodes_per_token"] == {"node-aware": 1.0, "groups moved": 1.0, "replicas across nodes": 2.0}


def test_a_placement_that_differs_between_ranks_stops_every_rank():
    every = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "placement_differs"}, stream=False,
                       timeout=120).value
    for result in every:
        for name in ("differs", "shape differs", "differs, hierarchical", "set_placement differs"):
            assert "the placement differs between ranks (ranks [1]" in result[name], (name, result[name])
        assert "a placement holds expert ids 0..3" in result["same on every rank, bad"]
        assert result["ranks done"] == 2
