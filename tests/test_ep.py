"""Expert parallelism equals the single-device layer, on 1, 2 and 4 gloo ranks."""
import pytest

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_ep_layers_equal_the_single_device_layer(nproc):
    rows = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "equality"}, stream=False,
                      timeout=600).value
    cases_per_variant = 8 if nproc > 1 else 7
    bank_cases = 6 if nproc > 1 else 5  # bmm and grouped behind allgather and alltoall
    capacity_cases = 3 * (2 * 3 + 2)  # 3 policy/bank variants; allgather and alltoall: 3 cases each, tp: 2
    looped_cases = 2 * 2 * 3  # the grouped bank's loop of mm, as a CPU runs it
    assert len(rows) == 2 * 2 * cases_per_variant + 2 * 2 * 3 + 2 * 2 * bank_cases + capacity_cases + 3 + looped_cases
    assert sum("capacity" in r["case"] for r in rows) == capacity_cases
    assert {r["dispatcher"] for r in rows} == {"allgather", "alltoall", "tp"}
    assert {r["experts"] for r in rows} == {"loop", "bmm", "grouped"}
    assert {"grad_experts.w13", "grad_router.weight", "grad_input", "output"} <= set(rows[-1]["errors"])
    def paths(looped):
        return {r["path"].split(":")[0] for r in rows
                if r["experts"] == "grouped" and r["case"].startswith("loop of mm") == looped}
    assert paths(False) == {"torch._grouped_mm (reference kernel)"}, paths(False)  # the grouped GEMM ran, not the loop
    # the loop of mm a CPU runs (a rank whose groups are all empty takes the equal-groups bmm)
    assert "grouped GEMM as a loop of mm" in paths(True), paths(True)
    assert paths(True) <= {"grouped GEMM as a loop of mm", "bmm of equal groups"}, paths(True)
    # every error, not just the worst: NaN > TOLERANCE is False, and max() can skip a NaN
    bad = [(r["dispatcher"], r["experts"], r["activation"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad


def test_ep_and_tp_layers_on_process_subgroups_equal_the_single_device_layer():
    every = run_script(WORKER, nproc=4, backend="gloo", params={"mode": "subgroups"}, stream=False,
                       timeout=300).value
    expected = [(d, g) for g in (0, 1) for d in ("allgather", "alltoall", "tp")]
    assert [(r["dispatcher"], r["group"]) for r in every] == expected
    assert all(e <= TOLERANCE for r in every for e in r["errors"].values()), every


@pytest.mark.parametrize("nproc", [2, 4])
def test_bad_input_on_one_rank_stops_every_rank(nproc):
    every = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "bad_input", "bad_rank": 1},
                       stream=False, timeout=300).value
    assert len(every) == nproc
    for rank, messages in enumerate(every):
        for key in ("allgather/dtype", "allgather/shape", "allgather/3-D", "alltoall/dtype", "alltoall/shape",
                    "alltoall/3-D"):
            msg = messages[key]
            if rank == 1:  # the rank whose input was bad names the problem
                assert ("dtype" in msg) if key.endswith("dtype") else ("hidden_dim=16" in msg), msg
            else:  # the others learn that rank 1 failed, instead of hanging
                assert "rank 1 of the expert-parallel group got invalid input" in msg, msg
        for key in ("tp/dtype", "tp/shape", "tp/3-D"):
            expected = ("MoELayer input" if rank == 1 else "a rank of the tensor-parallel group got invalid input")
            assert expected in messages[key], messages[key]
        assert "divisible" in messages["divisible"]
        assert "ffn_dim" in messages["tp divisible"] and "divisible" in messages["tp divisible"]


def test_our_alltoall_autograd_matches_pytorch():
    diffs = run_script(WORKER, nproc=3, backend="gloo", params={"mode": "alltoall_autograd"}, stream=False,
                       timeout=300).value
    assert diffs == {"forward": 0.0, "backward": 0.0}


def test_ep_dispatchers_need_an_initialized_process_group():
    for dispatcher in ("allgather", "alltoall"):
        with pytest.raises(RuntimeError, match="not initialized"):
            MoELayer(MoEConfig(), dispatcher)


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_traffic_is_counted_from_the_real_sizes(nproc):
    every = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "traffic"}, stream=False,
                       timeout=300).value
    for rank, per_dispatcher in enumerate(every):
        for name, check in per_dispatcher.items():
            assert check["measured"] == check["expected"], (rank, name)
            assert check.get("expected_received", check["received"]) == check["received"], (rank, name)
            if nproc == 1:
                assert sum(v for k, v in check["measured"].items() if k != "useful") == 0
    for name in every[0]:  # every byte sent is received by some rank, phase by phase
        for phase in every[0][name]["received"]:
            assert sum(r[name]["measured"][phase] for r in every) == sum(r[name]["received"][phase] for r in every)


def test_one_ep_x_dp_training_step_equals_the_single_device_step():
    result = run_script(WORKER, nproc=4, backend="gloo", params={"mode": "ep_dp"}, stream=False, timeout=300).value
    swiglu = {"experts.w13", "experts.w2"}
    expected = {"loop": {"router.weight"} | swiglu, "grouped": {"router.weight"} | swiglu,
                "shared": {"router.weight", "shared.w13", "shared.w2", "shared.gate"} | swiglu,
                "hash": {"shared.w1", "shared.w2", "experts.w1", "experts.w2"}}  # lesson 06: no router weight
    for variant, names in expected.items():
        errors = result[variant]
        assert errors.pop("weights_moved") > 1e-3  # the step really changed the weights
        assert set(errors) == names, variant
        assert max(errors.values()) <= TOLERANCE, (variant, errors)
    assert "must divide the world size" in result["bad ep_size"]


def test_bias_update_uses_the_global_load_on_every_rank():
    every = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "bias"}, stream=False, timeout=300).value
    # global loads 6 2 4 4, mean 4: the busy expert's bias goes down, the idle one's up, the average ones stay
    assert every == [[-0.5, 0.5, 0.0, 0.0]] * 2


def test_training_under_ep_keeps_the_replicated_router_identical():
    r = run_script(WORKER, nproc=2, backend="gloo", params={"mode": "train_ep"}, stream=False, timeout=300).value
    assert r["router_moved"] > 1e-3  # it trained
    assert r["summed_without_hang"]
    assert r["router_diff"] == 0.0 and r["bias_diff"] == 0.0
    assert r["shared_moved"] > 1e-3 and r["shared_diff"] == 0.0  # lesson 08's shared expert: trained, kept equal


@pytest.mark.parametrize("nproc", [4, 8])
def test_ep_and_tp_bytes_equal_the_model_at_group_sizes_4_and_8(nproc):
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "ep_vs_tp"}, stream=False, timeout=300).value
    # fp32 (4 bytes), h 16, T = 2N tokens per rank, k = 2: EP dispatch + combine 2·T·k·h·4·(N-1)/N,
    # TP a ring all-reduce of [T, h]: 2·(N-1)/N·T·h·4
    T, N = 2 * nproc, nproc
    assert r["ep"] == [2 * T * 2 * 16 * 4 * (N - 1) / N] * 2
    assert r["tp"] == [2 * (N - 1) / N * T * 16 * 4] * 2
    # the same global batch of N·T tokens: every TP rank runs all of it, and EP sends k/N of TP's bytes
    assert r["ep, same batch"] == r["ep"] + [T]
    assert r["tp, same batch"] == [2 * (N - 1) / N * N * T * 16 * 4] * 2 + [N * T]
    assert r["ep, same batch"][0] * N == 2 * r["tp, same batch"][0]
