"""Lesson 04's split of the layer's time: the GEMMs at the routing's group sizes, and where the device's time goes."""
import json
from types import SimpleNamespace as NS

import pytest
import torch

from launcher.run import REPO
from lessons_lib import MoEConfig
from lessons_lib.lab.group_sizes import TILE, routed_sizes, size_ways
from lessons_lib.lab.limits import equal_split, grouped_gemms_ms
from lessons_lib.lab.profile import device_span_us, split_device_time

IMAGES = REPO / "images"


def test_equal_split_keeps_the_total_and_the_number_of_groups():
    assert equal_split(15, 3) == [5, 5, 5]
    assert equal_split(7, 4) == [2, 2, 2, 1]
    assert equal_split(0, 2) == [0, 0]


def test_the_grouped_gemms_limit_refuses_sizes_that_do_not_make_its_rows_before_any_work():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32)
    with pytest.raises(ValueError, match="summing to rows=30"):
        grouped_gemms_ms(cfg, 30, torch.device("cpu"), sizes=[10, 10, 5, 4])
    with pytest.raises(ValueError, match="one row count >= 0"):
        grouped_gemms_ms(cfg, 30, torch.device("cpu"), sizes=[40, -10])


def test_the_grouped_gemms_limit_runs_at_given_sizes_where_the_grouped_gemm_does(monkeypatch):
    import lessons_lib.moe.experts_batched as eb

    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
    cpu = torch.device("cpu")
    assert grouped_gemms_ms(cfg, 30, cpu, sizes=[0, 20, 7, 3]) is None  # no fast kernel here
    monkeypatch.setattr(eb, "grouped_mm_support", lambda *a, **k: (True, "reference kernel"))
    for sizes in ([0, 20, 7, 3], [30, 0]):  # an empty group, and another number of groups than experts
        assert grouped_gemms_ms(cfg, 30, cpu, steps=2, warmup=1, sizes=sizes) > 0


def test_the_ways_split_the_routed_rows_as_named():
    routed = [500, 524, 512, 512]
    ways = size_ways(routed, tile=128)
    assert ways["equal"] == [512] * 4 and ways["routed"] == routed
    assert ways["routed, up to whole tiles"] == [512, 640, 512, 512]
    assert ways["equal, one row more"] == [513] * 4 and ways["equal, 64 rows fewer"] == [448] * 4
    assert all(len(s) == 4 for s in ways.values())
    with pytest.raises(ValueError, match="equal groups"):
        size_ways([1, 2])


def test_routed_sizes_are_the_layers_counts_of_every_pair():
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32)
    sizes = routed_sizes(cfg, 40, torch.device("cpu"))
    assert len(sizes) == 8 and sum(sizes) == 80 and min(sizes) >= 0
    assert len(set(sizes)) > 1  # random tokens: unequal groups


def _avg(key, device, self_us):
    return NS(key=key, device_type=NS(name=device), self_device_time_total=self_us)


def test_the_device_time_split_counts_grouped_gemms_apart_and_only_host_side_ops():
    averages = [_avg("aten::_grouped_mm", "CPU", 9000.0), _avg("aten::mm", "CPU", 400.0),
                _avg("aten::add_", "CPU", 600.0), _avg("cutlass_kernel", "CUDA", 9000.0),  # the kernel row itself
                _avg("aten::empty", "CPU", 0.0)]
    parts = split_device_time(averages, passes=2, top=1)
    assert parts["grouped_gemm_ms"] == pytest.approx(4.5)
    assert parts["top_ops"] == {"aten::add_": pytest.approx(0.3)}


def test_the_device_span_runs_from_the_first_work_to_the_last():
    def event(start, end, device="CUDA", annotation=False):
        return NS(device_type=NS(name=device), is_user_annotation=annotation, time_range=NS(start=start, end=end))

    assert device_span_us([event(10, 20), event(40, 45), event(0, 100, annotation=True),
                           event(0, 200, device="CPU")]) == 35
    assert device_span_us([]) == 0


def test_the_committed_group_sizes_record_shows_part_empty_tiles_cost_time():
    record = json.loads((IMAGES / "group_sizes_1xh200.json").read_text())
    assert "H200" in record["device"] and record["command"].startswith("python -m lessons_lib.lab.group_sizes")
    for tokens, ways in record["runs"].items():
        rows = int(tokens) * record["top_k"]
        for way in ("equal", "routed", "equal, one row more"):
            assert ways[way]["rows"] == sum(ways[way]["sizes"]) and len(ways[way]["sizes"]) == record["num_experts"]
        assert ways["equal"]["rows"] == ways["routed"]["rows"] == rows
        assert ways["equal"]["sizes"][0] % TILE == 0  # exactly whole tiles: the best case
        ms = {w: r["median_ms"] for w, r in ways.items()}
        assert ms["equal"] < ms["routed"] < ms["equal, one row more"]


def test_the_committed_1xh200_bench_splits_the_device_time_and_times_the_gemms_at_its_counts():
    record = json.loads((IMAGES / "bench_realistic_1xh200.json").read_text())
    for r in record["runs"]:
        d = r["device_time"]
        assert d["grouped_gemm_ms"] + d["other_ms"] + d["idle_ms"] == pytest.approx(d["span_ms"])
        assert 0 <= d["idle_ms"] < d["other_ms"] < d["grouped_gemm_ms"]
        rows = r["expert_rows"]
        assert rows["mean"] == r["tokens_per_rank"] * record["config"]["top_k"] / record["config"]["num_experts"]
        assert rows["min"] < rows["mean"] < rows["max"]
        assert r["grouped_gemms_equal_ms"] < r["grouped_gemms_at_counts_ms"] < r["fwd_bwd_ms"]


def test_the_layer_is_timed_both_ways_and_torchs_grouped_gemm_is_put_back():
    from lessons_lib.lab.group_sizes import layer_times

    original = torch._grouped_mm
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
    times = layer_times(cfg, 12, torch.device("cpu"), rounds=2, steps=1)
    assert set(times) == {"torch's tiles", "64-row tiles"}
    assert all(len(t["rounds_ms"]) == 2 and t["median_ms"] > 0 for t in times.values())
    assert torch._grouped_mm is original


def test_the_committed_small_tile_record_says_the_64_row_kernel_loses():
    record = json.loads((IMAGES / "group_sizes_1xh100.json").read_text())
    assert "H100" in record["device"]
    for tokens, ways in record["runs"].items():
        for sizes in ("equal", "routed"):
            assert ways[f"{sizes}, 64-row tiles"]["median_ms"] > 1.1 * ways[sizes]["median_ms"]
        layer = record["layer"][tokens]
        assert layer["64-row tiles"]["median_ms"] > 1.1 * layer["torch's tiles"]["median_ms"]
