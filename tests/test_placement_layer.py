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
