"""The benchmark suite runs under torchrun on any world size and records what it claims to measure."""
import json
import re
import subprocess
import sys

import pytest
import torch

from launcher.run import REPO
from lessons_lib.lab.bench import layer_flops, markdown
from lessons_lib.lab.shapes import SHAPES
from lessons_lib.lab.sizes_readback import WAYS
from lessons_lib.moe.dispatch_alltoall import read_later


def _run_or_kill(cmd: list, timeout: float) -> None:
    """Run torchrun; on a hang kill it and every rank (ranks live in sessions of their own), and fail with
    what they printed, so that no orphan rank keeps the CI machine's 2 cores busy."""
    from launcher.run import _kill_tree

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"the benchmark hung for {timeout} s and was killed:\n{proc.stdout.read()[-3000:]}")
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.parametrize("nproc", [1, 4])
def test_bench_suite_runs_on_gloo_and_writes_its_record(nproc, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lessons_lib.lab.bench", "--shape", "small", "--tokens", "8", "--steps", "2", "--warmup", "1",
           "--experts", "loop", "grouped", "--out", str(out)]
    _run_or_kill(cmd, timeout=600)
    record = json.loads(out.read_text())
    assert record["world_size"] == nproc and record["backend"] == "gloo" and record["device"] == "cpu"
    assert [(r["dispatcher"], r["experts"]) for r in record["runs"]] == [
        ("allgather", "loop"), ("allgather", "grouped"), ("alltoall", "loop"), ("alltoall", "grouped")]
    cfg = SHAPES["small"][0]
    H, k = cfg.hidden_dim, cfg.top_k
    # by hand: router 2·T·H·E, then T·k rows through two [256, 1024] GEMMs of 2 FLOPs per multiply-add
    assert layer_flops(cfg, 8) == 2 * 8 * 256 * 16 + 8 * 2 * (2 * 256 * 1024 * 2) == 16_842_752
    for r in record["runs"]:
        assert r["train_step_ms"] > 0 and set(r["phases_ms"]) == {"route", "dispatch", "experts", "combine"}
        assert r["tflops_per_gpu"] == pytest.approx(3 * layer_flops(cfg, 8) / r["fwd_bwd_ms"] / 1e9)
        if r["dispatcher"] == "allgather":  # every rank sends its padded 8·k rows to each of the N-1 others
            assert r["bytes_sent"]["dispatch"] == (nproc - 1) * 8 * k * H * 4
        else:  # only rows for other ranks' experts, at most all 8·k of them
            assert r["bytes_sent"]["dispatch"] <= 8 * k * H * 4 * (nproc > 1)
    lim = record["limits"]["8"]
    assert lim["adamw_ms"] > 0 and lim["step_floor_ms"] == lim["adamw_ms"] + lim["dense_ffn_fwd_bwd_ms"]
    a2a = lim["alltoall"]
    assert a2a["bytes_per_rank"] == 8 * k * H * 4 and (a2a["busbw_gbps"] is None) == (nproc == 1)
    sync = lim["collective"]  # on a CPU: one collective of the dispatch's size, back to back and after compute
    assert sync["bytes_per_rank"] == 8 * k * H * 4
    assert 0 < sync["back_to_back_ms"] < 1e3 and 0 < sync["after_compute_ms"] <= sync["after_compute_p90_ms"] < 1e3
    assert 0 <= sync["arrival_spread_ms"] < 1e3
    table = out.with_suffix(".md").read_text()
    assert table == markdown(record) and "| alltoall | grouped | 8 |" in table
    assert "takes " in table and "back to back" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("activation, input_grad, share", [("swiglu", True, 1.0), ("swiglu", False, 7 / 9),
                                                           ("gelu", True, 1.0), ("gelu", False, 5 / 6)])
def test_the_dense_ffn_reference_runs_the_flops_it_is_credited_with(activation, input_grad, share):
    """bench divides 3 x the forward FLOPs by the dense FFN's time: its backward must compute all of them
    (input gradient included); without the input's gradient it runs the share the floors of lesson 02 compare with."""
    from torch.utils.flop_counter import FlopCounterMode

    from lessons_lib import MoEConfig
    from lessons_lib.lab.limits import dense_ffn_ms
    from lessons_lib.moe.experts_batched import flops_per_row

    cfg = MoEConfig(hidden_dim=32, ffn_dim=64, activation=activation)
    with FlopCounterMode(display=False) as counter:
        dense_ffn_ms(cfg, 16, torch.device("cpu"), steps=1, warmup=0, input_grad=input_grad)
    assert counter.get_total_flops() == pytest.approx(share * 3 * 16 * flops_per_row(cfg))


def test_bench_started_without_torchrun_says_how_to_run_it_in_one_line():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "lessons_lib.lab.bench", "--shape", "small"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "lessons_lib.lab.bench runs on every rank under torchrun: torchrun --standalone --nproc-per-node 2 "
        "-m lessons_lib.lab.bench --shape small  (or: make bench)"]


def test_the_markdown_table_has_as_many_separators_as_columns():
    import glob

    for path in glob.glob(str(REPO / "images" / "bench_*.md")) + [None]:
        record = json.loads((REPO / "images" / "bench_small_cpu.json").read_text())
        text = open(path).read() if path else markdown(record)
        rows = [line for line in text.splitlines() if line.startswith("| dispatcher")]
        for header in rows:
            sep = text.splitlines()[text.splitlines().index(header) + 1]
            assert header.count("|") == sep.count("|"), path


def test_the_committed_profile_gives_the_grouped_gemm_time_lesson_04_reads():
    from lessons_lib.lab.profile import op_device_time

    seconds, calls = op_device_time((REPO / "images" / "profile_realistic_2xh200.txt").read_text(), "aten::_grouped_mm")
    assert calls == 35 and abs(seconds - 0.0495) < 0.0005


def test_device_busy_time_counts_overlapping_work_once_and_no_annotations():
    from types import SimpleNamespace as NS

    from lessons_lib.lab.profile import device_busy_us

    def event(start, end, device="CUDA", annotation=False):
        return NS(device_type=NS(name=device), is_user_annotation=annotation, time_range=NS(start=start, end=end))

    events = [event(10, 20), event(15, 30), event(40, 45), event(41, 42),  # two overlaps: [10, 30] and [40, 45]
              event(0, 100, annotation=True), event(50, 90, device="CPU")]  # neither is device work
    assert device_busy_us(events) == 25
    assert device_busy_us([]) == 0


def test_the_committed_1xh200_profile_says_how_long_the_device_was_busy():
    header = (REPO / "images" / "profile_realistic_1xh200.txt").read_text().splitlines()[3]
    busy, wall, idle = (float(v) for v in re.findall(r"([\d.]+) ms", header))
    assert header.startswith("device busy per step:") and 0 < busy < wall
    assert idle == pytest.approx(wall - busy, abs=0.01)


def test_the_peer_block_computes_our_layers_function_from_our_weights():
    """transformers' Qwen3-MoE block, loaded by `peers.qwen3_moe_block`, gives our layer's outputs: the bench's peer
    is timed doing the same work (its grouped_mm experts and its eager loop alike)."""
    pytest.importorskip("transformers")
    from lessons_lib import MoEConfig, MoELayer
    from lessons_lib.lab.peers import peer_ms, qwen3_moe_block, why_no_peer
    from lessons_lib.moe.init import init_full_state_dict

    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
    sd = init_full_state_dict(cfg)
    layer = MoELayer(cfg)
    layer.load_full_state_dict(sd)
    x = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(0))
    mine, _ = layer(x.view(-1, 16))
    for implementation in ("eager", "grouped_mm"):
        with torch.no_grad():
            out = qwen3_moe_block(cfg, sd, torch.device("cpu"), implementation)(x)
        theirs = (out[0] if isinstance(out, tuple) else out).view(-1, 16)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert mine.abs().max() > 0.1
    timed = peer_ms(cfg, sd, 24, torch.device("cpu"), steps=2, warmup=1)
    assert timed["fwd_bwd_ms"] > 0 and timed["transformers"]
    assert "SwiGLU" in why_no_peer(MoEConfig(activation="gelu"))
    assert peer_ms(MoEConfig(activation="gelu"), {}, 8, torch.device("cpu"), 1, 0)["skipped"]


def test_the_grouped_gemms_limit_runs_where_the_grouped_gemm_does(monkeypatch):
    """On a CPU there is no fast grouped GEMM, so no limit (None); with torch's reference kernel allowed, both
    variants run (the GEMM kernels alone, and the bank's math under autograd)."""
    import lessons_lib.moe.experts_batched as eb
    from lessons_lib import MoEConfig
    from lessons_lib.lab.limits import grouped_gemms_ms

    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
    cpu = torch.device("cpu")
    assert grouped_gemms_ms(cfg, 30, cpu, steps=1, warmup=0) is None
    monkeypatch.setattr(eb, "grouped_mm_support", lambda *a, **k: (True, "reference kernel"))
    for with_activation in (False, True):
        assert grouped_gemms_ms(cfg, 30, cpu, steps=2, warmup=1, with_activation=with_activation) > 0


def test_the_limits_time_the_gemms_of_the_experts_one_rank_holds(monkeypatch):
    """On N ranks a rank holds E/N experts, which receive T·k rows in all when balanced: the GEMMs-alone limit is
    those E/N groups, not E groups of the same rows (which would be N times the weights, in smaller groups)."""
    import lessons_lib.lab.bench as bench
    from lessons_lib import MoEConfig

    seen = []

    def fake_grouped_gemms_ms(cfg, rows, device, steps, warmup, with_activation=False, sizes=None):
        seen.append((rows, sizes))
        return 1.0

    monkeypatch.setattr(bench, "grouped_gemms_ms", fake_grouped_gemms_ms)
    for name in ("alltoall_bus_bandwidth", "collective_latency"):
        monkeypatch.setattr(bench, name, lambda *a, **k: {})
    monkeypatch.setattr(bench, "dense_ffn_ms", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bench.dist, "get_world_size", lambda *a: 4)
    bench.limits(MoEConfig(num_experts=16, top_k=2, hidden_dim=8, ffn_dim=8), 10, torch.device("cpu"), steps=1)
    assert seen == [(20, [5, 5, 5, 5])] * 2  # 4 experts per rank, 20 rows


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_split_sizes_read_later_are_the_values_tolist_gives(device):
    t = torch.tensor([3, 0, 7, 123456789012], device=device)
    assert read_later(t)() == read_later(t, block=True)() == [3, 0, 7, 123456789012]
    assert read_later(t[:0])() == []


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_sizes_readback_measurement_times_both_ways_and_writes_its_record(nproc, tmp_path):
    out = tmp_path / "readback.json"
    _run_or_kill([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                  "-m", "lessons_lib.lab.sizes_readback", "--out", str(out)], timeout=600)
    record = json.loads(out.read_text())
    assert record["world_size"] == nproc and record["device"] == "cpu"
    run = record["runs"]["64"]
    assert list(run["rounds_ms"]) == list(WAYS if nproc == 1 else WAYS[1:])  # `local`: one rank only
    assert all(len(t) == 4 and min(t) > 0 for t in run["rounds_ms"].values())
    assert all(min(t) <= run["median_ms"][way] <= max(t) for way, t in run["rounds_ms"].items())


def test_the_committed_1xh100_record_since_w13_beats_transformers_and_uses_no_more_memory():
    """Issue 21's checks on the record lesson 04 and the README quote: transformers' block takes more than 1.35 x
    ours at every size, the peak memory is not above the 1xH200 record's of the bank before w13, and the layer lies
    between its routing's GEMMs alone and 1.2 x them."""
    after = json.loads((REPO / "images" / "bench_realistic_1xh100.json").read_text())
    before = json.loads((REPO / "images" / "bench_realistic_1xh200.json").read_text())
    assert "H100" in after["device"] and {r["tokens_per_rank"] for r in after["runs"]} == {4096, 8192}
    peak_before = {(r["dispatcher"], r["tokens_per_rank"]): r["peak_mem_gb"] for r in before["runs"]}
    for r in after["runs"]:
        peer = after["peers"][str(r["tokens_per_rank"])]["fwd_bwd_ms"]
        assert peer > 1.35 * r["fwd_bwd_ms"]
        assert r["peak_mem_gb"] <= peak_before[r["dispatcher"], r["tokens_per_rank"]]
        assert r["grouped_gemms_at_counts_ms"] < r["fwd_bwd_ms"] < 1.2 * r["grouped_gemms_at_counts_ms"]
