"""Lesson 15: decode with worst-case static buffers computes what the layer computes whole, on ranks and on one; the
buffers' bill; the floor of reading the touched experts' weights once."""
import dataclasses
import math

import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.decode_latency import decode_floor_ms, static_buffer_bytes
from lessons_lib.moe.capacity import static_dropless
from lessons_lib.moe.static_decode import StaticDecode
from lessons_lib.moe.two_batch import two_batch_forward

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5


@pytest.mark.parametrize("nproc", [2, 4])
def test_static_decode_equals_the_whole_layer_on_ranks(nproc):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "static"}, stream=False,
                      timeout=600).value
    assert len(rows) == 7 and {r["case"] for r in rows} >= {"hash", "table", "a rank with zero tokens", "top_k = E"}
    assert all(r["error"] <= TOLERANCE for r in rows), rows


def test_static_decode_and_two_batches_on_one_rank(one_rank):
    """Lesson 15's static path and lesson 09's two micro-batches on one rank, and what each refuses."""
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


def test_the_decode_floor_counts_the_touched_experts_once():
    # one token choosing 8 of 256: each of the 32 local experts touched with probability 8/256, so 1 expected
    one = decode_floor_ms(1, 8, 256, 32, 1_000_000, 1.0)
    assert math.isclose(one, 32 * (8 / 256) * 1_000_000 / 1e9 * 1e3)
    assert math.isclose(decode_floor_ms(10_000, 8, 256, 32, 10**6, 1.0), 32.0)  # every expert, read once
    assert decode_floor_ms(0, 8, 256, 32, 10**6, 1.0) == 0.0
    assert decode_floor_ms(3, 4, 4, 2, 1000, 1.0) == 2 * 1000 / 1e9 * 1e3  # k = E: every expert touched
