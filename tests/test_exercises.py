"""The exercise checker: the library's solutions pass, wrong answers fail naming the case, stubs do not crash."""
import json
import math

import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib.course import checker
from lessons_lib.course.checker import check, pick, run_check
from lessons_lib.course.exercises import EXERCISES

SINGLE_PROCESS = [k for k in EXERCISES if not EXERCISES[k].collective]  # 03.3 and 10.3 need ranks: below


def test_every_lesson_from_01_to_15_has_two_or_three_exercises():
    """Lesson 06 has four: hash routing joined it in course v2, with its exercise."""
    per_lesson = {}
    for key in EXERCISES:
        per_lesson[key[:2]] = per_lesson.get(key[:2], 0) + 1
    assert sorted(per_lesson) == [f"{n:02d}" for n in range(1, 16)]
    assert all(2 <= n <= 3 for lesson, n in per_lesson.items() if lesson != "06"), per_lesson
    assert per_lesson["06"] == 4


@pytest.mark.parametrize("key", SINGLE_PROCESS)
def test_the_library_solution_passes_its_own_check(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "graded" / "results.json"
    results.parent.mkdir()
    monkeypatch.setenv("EXERCISE_RESULTS", str(results))
    assert check(key, pick(key, None, solutions=True))
    assert json.loads(results.read_text())[key]["status"] == "passed"
    assert list(tmp_path.iterdir()) == [results.parent], "nothing written where it was run"


def test_a_check_run_by_hand_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EXERCISE_RESULTS", raising=False)
    assert check("01.1", pick("01.1", None, solutions=True))
    assert list(tmp_path.iterdir()) == []


T = torch.tensor
# Each exercise's reference against a value worked out by hand: the checks compare students with the
# references, so a wrong reference would fail right answers.
KNOWN = {
    "01.1": ((T([[0.1, 0.2, 0.3, 0.4]]).log(), 2, True), (T([[4 / 7, 3 / 7]]), T([[3, 2]]))),
    "01.2": ((T([[1.0, 0], [0, 1], [2, 2]]), T([1, 1, 0]), T([0.5, 2.0, 1.0]), 3), T([[2.0, 2], [0.5, 2], [0, 0]])),
    "02.1": ((T([5, 4, -1, 5, 6]), 4, 6), T([1, 0, 3])),
    "02.2": (([5, 9, 2], 10), [180, 180, 180]),  # pad to 9 rows, send to 2 others
    "03.1": ((T([0, 7, 3, 4, 4]), 8, 2), [2, 3]),
    "03.2": ((T([2, 0, 1, 0]),), (T([1, 3, 2, 0]), T([3, 0, 2, 1]))),
    "04.1": ((T([[1.0], [2], [3]]), T([1, 0, 2])), T([[[1.0], [0]], [[0], [0]], [[2], [3]]])),
    "04.2": ((T([3, 1, 0]), 10), 50),  # 3 groups x 3 rows computed, 4 useful
    "05.1": ((2, 50, 2, 1.1), 55),
    "05.2": ((T([0, 1, 0, 0, 1]), T([0.1, 0.9, 0.5, 0.3, 0.2]), 3, 2, "probs"), T([False, True, True, True, True])),
    "06.1": ((T([0.0, 0, 0, 0]), T([10.0, 2, 4, 4]), 0.1), T([-0.1, 0.1, 0.1, 0.1])),
    "06.2": ((T([[0.0, 0], [1, 3]]),), T((math.log(2) ** 2 + math.log(math.e + math.e ** 3) ** 2) / 2)),
    "06.3": ((T([[0], [0], [0], [1]]), T([[0.75, 0.25]] * 4)), T(2 * (0.75 ** 2 + 0.25 ** 2))),
    "07.1": ((4, 1024, 2, 8, 2), 2 * 4 * 2 * 1024 * 2 * 7 / 8),
    "07.2": ((32, 1024, 8, 2), 2 * 7 / 8 * 32 * 1024 * 2),
    # routed + gelu(1)·[2, 0], gelu(1) = Φ(1) = 0.8413447
    "08.1": ((T([[1.0, 0]]), T([[0.5, 0.5]]), T([[1.0], [0]]), T([[2.0, 0]]), None, "gelu"),
             T([[0.5 + 2 * 0.8413447, 0.5]])),
    # swiglu, S = 1: h = x·w1 = [gate 1, up 3] -> silu(1)·3 = 0.7310586·3, times w2 = [1, -1]
    "08.1 swiglu": ((T([[1.0, 0]]), T([[0.0, 0.0]]), T([[1.0, 3.0], [0, 0]]), T([[1.0, -1.0]]), None, "swiglu"),
                    T([[3 * 0.7310586, -3 * 0.7310586]])),
    "08.2": ((T([[0, 3], [1, 1], [2, 3]]), 4, 2), T([2, 1, 1])),
    "08.3": ((16, 4096, 2, 4, 1), (63, 1024, 7, 1024)),  # DeepSeekMoE §3: 64 fine experts, 1 shared, top 8 - 1
    "09.1": ((93.7, [(11.4, 9.8), (11.4, 20.6)]), 93.7 - 9.8 - 11.4),
    "09.2": ((4.0, 6.0, 2.0, 1.0), 2.5 + 3 + 3 + 1.5),  # halves: dispatch 1 + 3 / 2, combine 1 + 1 / 2, experts 3
    # 8 experts on 4 nodes {0,1} {2,3} {4,5} {6,7}; seen from node 1
    "10.1": ((T([[0, 2, 7], [2, 3, 3], [4, 5, 6]]), 8, 4, 1), T([2, 0, 2])),
    "10.2": ((T([[0, 2, 7], [2, 3, 3], [4, 5, 6]]), 8, 4), [1, 2, 1, 2]),
    # expert 3 (load 12) on 3 slots: 4 per slot; rank 0 holds 0, 1 and one 3; rank 1 holds 2 and two 3s
    "11.1": ((T([[0, 1, 3], [2, 3, 3]]), T([1.0, 2.0, 3.0, 12.0])), T([7.0, 11.0], dtype=torch.float64)),
    "11.2": ((T([90.0, 30.0, 20.0, 10.0]), 6), [3, 1, 1, 1]),  # 90 -> 45 -> 30 per replica
    # expert 3's slots are 2, 4, 5; rank 1 starts at its replica 1 (slot 4): pairs of 3 take 4, 5, 2, then 4
    "11.3": ((T([[0, 1, 3], [2, 3, 3]]), T([[3, 0], [3, 1], [3, 2], [1, 3]]), 1),
             T([[4, 0], [5, 1], [2, 3], [1, 4]])),
    # amax 300: scale 1, 300 rounds to 288 (e4m3 steps of 32 there); amax 3: 3/448 = 2^-7.2, scale 2^-7, so 3 and
    # 0.5 become 384 and 64; zeros: scale 1
    "12.1": ((T([[300.0, -1.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]]), 2),
             (T([[288.0, -1.0, 384.0, 64.0], [0.0, 0.0, 0.0, 0.0]]), T([[1.0, 2.0 ** -7], [1.0, 1.0]]))),
    "12.2": ((T([[2.0, 3.0, -4.0, 1.0]]), T([[0.5, 4.0]])), T([[1.0, 1.5, -16.0, 4.0]])),
    # rank 0 of 2 owns experts 0, 1: pairs (0,3) (1,2) (2,3) send 1 + 1 + 2 rows of 7168 + 4·56 bytes
    "12.3": ((T([[0, 3], [1, 2], [2, 3]]), 4, 2, 0, 7168, 128), 4 * (7168 + 224)),
    "15.1": ((256, 8, 128, 7168, 2), 256 * 128 * 7168 * 2),  # 32 experts x 8 ranks x 128 slots: 470 MB
    "15.2": ((3, 4, 4, 2, 1000, 1.0), 2 * 1000 / 1e9 * 1e3),  # k = E: both local experts read once, 1 KB at 1 GB/s
    "13.2": ((256, 512, 2, "mxfp4"), 2 * 256 * 512 // 2 + 2 * 256 * 512 // 32),
    "14.2": ((256, 8, 8, 200.0), 800),  # 32 local experts: T·8/32 FLOPs per byte reach 200 at T = 800
    # a zero query weighs the positions it sees equally: cached values 1, 3 at 0, 1; the new one, 5, at 2
    "14.1": ((torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), T([[[[5.0]]]]), torch.zeros(1, 1, 4, 1),
              T([[[[1.0], [3.0], [9.0], [9.0]]]]), 2),
             (T([[[[3.0]]]]), torch.zeros(1, 1, 4, 1), T([[[[1.0], [3.0], [5.0], [9.0]]]]))),
}


def test_the_hash_load_exercise_by_its_properties():
    """06.4's reference (no value to work by hand: it is a hash): one id fills exactly k experts, every token
    counts k times, and a uniform stream of ids loads every expert within 10% of the mean."""
    ref = EXERCISES["06.4"].reference
    one = ref(torch.full((10,), 7), 8, 2, 0)
    assert sorted(one.tolist()) == [0] * 6 + [10, 10]
    spread = ref(torch.arange(16_000), 16, 4, 3)
    assert spread.sum() == 64_000 and (spread - 4000).abs().max() < 400


def test_an_fp4_rounding_by_hand():
    """13.1: a block whose largest magnitude is 6 keeps the scale 1; 2.4 rounds to 2, 2.5 (a tie) down to 2, 5 to
    4 (tie to the lower), -0.3 to -0.5 and 0.2 to 0."""
    w = torch.zeros(32, 2)
    w[:6, 0] = T([6.0, 2.4, 2.5, 5.0, -0.3, 0.2])
    w[0, 1] = 12.0  # the second column: amax 12 -> scale 2, so 12 stays 12
    got = EXERCISES["13.1"].reference(w)
    assert got[:6, 0].tolist() == [6.0, 2.0, 2.0, 4.0, -0.5, 0.0] and got[0, 1].item() == 12.0


BY_PROPERTY = {"06.4", "13.1"}  # a hash, and a rounding: checked by the two tests above


@pytest.mark.parametrize("key", [k for k in SINGLE_PROCESS if k not in BY_PROPERTY] + ["08.1 swiglu"])
def test_the_library_solution_gives_the_hand_worked_value(key):
    args, expected = KNOWN[key]
    torch.testing.assert_close(EXERCISES[key.split()[0]].reference(*args), expected, check_dtype=False)


def test_the_position_policy_of_the_mask_exercise_by_hand():
    got = EXERCISES["05.2"].reference(T([0, 1, 0, 0, 1]), T([0.1, 0.9, 0.5, 0.3, 0.2]), 3, 2, "position")
    assert got.tolist() == [True, True, True, False, True]


def test_a_stub_is_reported_not_implemented_without_raising(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXERCISE_RESULTS", str(tmp_path / "exercise_results.json"))

    def split_sizes(expert_ids, num_experts, world_size):
        raise NotImplementedError("your turn")

    assert check("03.1", split_sizes) is False
    assert "not implemented yet" in capsys.readouterr().out
    assert json.loads((tmp_path / "exercise_results.json").read_text())["03.1"]["status"] == "not implemented"


def test_a_wrong_answer_names_the_case_inputs_expected_and_got():
    def topk_without_renormalizing(logits, k, normalize):
        return logits.softmax(-1).topk(k, dim=-1)  # forgets normalize

    result = run_check("01.1", topk_without_renormalizing)
    assert result["status"] == "failed"
    assert "case 'random'" in result["message"] and "expected:" in result["message"] and "got:" in result["message"]


def test_an_edge_case_is_caught():
    def splits_forgetting_empty_ranks(expert_ids, num_experts, world_size):
        return torch.bincount(expert_ids // (num_experts // world_size)).tolist()  # no minlength

    result = run_check("03.1", splits_forgetting_empty_ranks)
    assert result["status"] == "failed" and "one hot expert" in result["message"]


def test_a_crashing_answer_is_reported_with_its_inputs():
    result = run_check("04.1", lambda x, counts: x.view(len(counts), int(counts.max()), -1))  # 27 elements, [3, 4, -1]
    assert result["status"] == "failed" and "raised RuntimeError" in result["message"]
    assert "inputs:" in result["message"]


def test_the_float_trap_of_the_capacity_exercise():
    result = run_check("05.1", lambda k, T, E, f: __import__("math").ceil(k * T / E * f))
    assert result["status"] == "failed" and "float trap" in result["message"]


def test_the_alltoall_backward_exercise_runs_on_ranks():
    every = run_script(REPO / "tests" / "ep_worker.py", nproc=3, backend="gloo", params={"mode": "exercise"},
                       stream=False, timeout=300).value
    assert every == {"solution": "passed", "stub": "not implemented", "forward instead of backward": "failed",
                     "wrong on one rank": "failed", "10.3 solution": "passed", "10.3 not reduced": "failed",
                     "10.3 pairs, not nodes": "failed", "10.3 rank % nodes": "failed"}


def test_the_inter_node_bytes_exercise_fails_a_node_of_rank_modulo_nodes_at_two_ranks():
    """10.3 at 2 ranks, where both real topologies (1 node × 2, 2 × 1) give rank % nodes == rank // ranks_per_node:
    the check's made-up larger clusters must still tell them apart."""
    every = run_script(REPO / "tests" / "ep_worker.py", nproc=2, backend="gloo", params={"mode": "exercise_node_bytes"},
                       stream=False, timeout=300).value
    assert every == {"10.3 solution": "passed", "10.3 not reduced": "failed", "10.3 pairs, not nodes": "failed",
                     "10.3 rank % nodes": "failed"}


def test_replicas_for_the_largest_load_per_replica_after_the_slot_fail():
    """11.2: each spare slot to argmax(load / (replicas + 1)) gives loads [3, 2] on 4 slots [3, 1] (2.0 per replica
    of expert 1) where [2, 2] leaves 1.5."""
    def after_the_slot(load, num_slots):
        replicas = [1] * len(load)
        for _ in range(num_slots - len(load)):
            e = max(range(len(load)), key=lambda e: (float(load[e]) / (replicas[e] + 1), -e))
            replicas[e] += 1
        return replicas

    assert after_the_slot(T([3.0, 2.0]), 4) == [3, 1] and after_the_slot(T([5.0, 3.0]), 4) == [3, 1]
    result = run_check("11.2", after_the_slot)
    assert result["status"] == "failed" and "now, not after" in result["message"], result

    def after_the_slot_high_id_on_a_tie(load, num_slots):  # passes the tied case: the case without a tie catches it
        replicas = [1] * len(load)
        for _ in range(num_slots - len(load)):
            e = max(range(len(load)), key=lambda e: (float(load[e]) / (replicas[e] + 1), e))
            replicas[e] += 1
        return replicas

    result = run_check("11.2", after_the_slot_high_id_on_a_tie)
    assert result["status"] == "failed", result


def test_replicas_handed_out_in_slot_token_order_fail():
    """11.3 asks for the pairs in (token, slot) order: the same rule over (slot, token) order must fail."""
    from lessons_lib.moe.placement import Replicas

    def slot_token_order(placement, expert_ids, rank):
        replicas = Replicas(placement, int(placement.max()) + 1, rank, placement.shape[0])
        return replicas.physical(expert_ids.t().contiguous()).t()

    result = run_check("11.3", slot_token_order)
    assert result["status"] == "failed" and "(token, slot) order" in result["message"], result


def test_grade_lists_the_exercises(capsys):
    checker.main(["list"])
    out = capsys.readouterr().out
    assert "03.3  the backward of the all-to-all" in out


def test_grade_runs_a_students_notebook_and_reports_each_exercise(tmp_path, capsys):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("SOLUTIONS = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from lessons_lib.course.checker import check, pick\n"
            "def ep_bytes(tokens, hidden, top_k, group_size, bytes_per_element):\n"
            "    raise NotImplementedError\n"
            "def tp_bytes(tokens, hidden, group_size, bytes_per_element):\n"
            "    return 2 * tokens * hidden * bytes_per_element  # wrong: ignores (N-1)/N\n"
            "check('07.1', pick('07.1', ep_bytes, SOLUTIONS)); check('07.2', pick('07.2', tp_bytes, SOLUTIONS))")]
    path = tmp_path / "student.ipynb"
    nbformat.write(nb, str(path))
    checker.main(["grade", str(path)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["ran"] and {k: v["status"] for k, v in record["results"].items()} == {
        "07.1": "not implemented", "07.2": "failed"}
    checker.main(["grade", str(path), "--solutions"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {v["status"] for v in record["results"].values()} == {"passed"}


def test_an_unstable_sort_fails_the_exercises_that_ask_for_a_stable_one():
    def rows_of_rank(gathered_expert, first, last):
        keep = torch.nonzero((gathered_expert >= first) & (gathered_expert < last)).squeeze(1)
        return keep[torch.argsort(gathered_expert[keep])]  # not stable

    def group_by_rank(dest):
        order = torch.argsort(dest)  # not stable
        return order, torch.argsort(order)

    for key, fn, case in (("02.1", rows_of_rank, "many rows per expert"),
                          ("03.2", group_by_rank, "many rows per rank")):
        result = run_check(key, fn)
        assert result["status"] == "failed" and case in result["message"], result


def test_a_tensor_is_not_the_int_that_is_asked_for():
    result = run_check("04.2", lambda counts, flops: (len(counts) * counts.max() - counts.sum()) * flops)
    assert result["status"] == "failed" and "should be a Python int, got Tensor" in result["message"]


def test_a_cache_step_without_the_causal_mask_fails_where_a_query_could_see_ahead():
    def no_mask(q, k, v, cache_k, cache_v, start):
        S = q.shape[2]
        cache_k[:, :, start:start + S], cache_v[:, :, start:start + S] = k, v
        y = torch.nn.functional.scaled_dot_product_attention(q, cache_k[:, :, :start + S], cache_v[:, :, :start + S])
        return y, cache_k, cache_v

    result = run_check("14.1", no_mask)  # a single new position sees everything anyway; a prefill must not
    assert result["status"] == "failed" and "prefill" in result["message"]


def test_a_cache_step_that_does_not_fill_the_cache_fails():
    def concatenates(q, k, v, cache_k, cache_v, start):
        keys, values = torch.cat([cache_k[:, :, :start], k], 2), torch.cat([cache_v[:, :, :start], v], 2)
        S = q.shape[2]
        sees = torch.arange(start + S) <= start + torch.arange(S)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=sees), cache_k, cache_v

    result = run_check("14.1", concatenates)  # the right output, but the next step would not find k and v
    assert result["status"] == "failed"


def test_two_micro_batches_timed_as_one_fail_their_exercise():
    assert run_check("09.2", lambda d, e, c, f: d + e + c)["status"] == "failed"


def test_two_micro_batches_without_the_fixed_cost_fail_and_the_hint_does_not_give_the_formula():
    """09.2 asks for the model with a fixed cost per exchange; the model without it (each half half of every phase)
    is the wrong answer it must reject, and the hint gives the direction, not the expression."""
    def halves_of_everything(dispatch, experts, combine, fixed):
        d, e, c = dispatch / 2, experts / 2, combine / 2
        return d + max(d, e) + max(c, e) + c
    result = run_check("09.2", halves_of_everything)
    assert result["status"] == "failed" and "fixed cost" in result["message"], result
    hint_text = EXERCISES["09.2"].hint
    assert "max(" not in hint_text and "/ 2" not in hint_text and "+" not in hint_text


def _hash_ids(ids, E, seed):
    from lessons_lib.moe.hash_router import expert_hash

    return expert_hash(ids, E, seed)


@pytest.mark.parametrize("name, wrong", [
    ("the token ids themselves", lambda ids, E, k, seed: torch.bincount(ids, minlength=E)[:E]),
    ("ids modulo E", lambda ids, E, k, seed: torch.bincount(ids % E, minlength=E)),
    ("ids modulo E, k times", lambda ids, E, k, seed: k * torch.bincount(ids % E, minlength=E)),
    ("only the best expert", lambda ids, E, k, seed: torch.bincount(_hash_ids(ids, E, seed).argmax(1), minlength=E)),
    ("the hash of seed 0", lambda ids, E, k, seed: torch.bincount(_hash_ids(ids, E, 0).topk(k).indices.flatten(),
                                                                  minlength=E)),
])
def test_the_hash_load_exercise_fails_bincount_on_the_wrong_ids(name, wrong):
    """06.4: counting ids that are not the hash router's expert ids must fail, whatever shape it comes in."""
    assert run_check("06.4", wrong)["status"] == "failed", name


def test_the_block_exercise_fails_gelu_on_deepseek_v3s_swiglu_case():
    """08.1: DeepSeek-V3's shared expert is SwiGLU; an answer that always applies gelu(x·w1)·w2 fails on that case."""
    def always_gelu(x, routed, w1, w2, gate, activation):
        shared = torch.nn.functional.gelu(x @ w1[:, :w2.shape[0]]) @ w2
        return routed + (torch.sigmoid(x @ gate.T) * shared if gate is not None else shared)
    result = run_check("08.1", always_gelu)
    assert result["status"] == "failed" and "DeepSeek-V3: swiglu" in result["message"], result


def test_the_block_exercise_fails_a_gate_on_the_routed_part_too():
    def gates_everything(x, routed, w1, w2, gate, activation):
        full = EXERCISES["08.1"].reference(x, routed, w1, w2, None, activation)
        return full * torch.sigmoid(x @ gate.T) if gate is not None else full
    result = run_check("08.1", gates_everything)
    assert result["status"] == "failed" and "gated" in result["message"], result


@pytest.mark.parametrize("key", ["06.4", "08.2", "08.3", "09.2"])
def test_these_hints_give_a_direction_not_the_solution(key):
    """The hints rewritten in course v2 name what to think about, not the code: no call and no operator that would
    be the answer."""
    text = EXERCISES[key].hint
    for giveaway in ("torch.", ".topk(", "bincount", "scatter", "//", "max(", " * m", "m·E", "m·k"):
        assert giveaway not in text, (key, giveaway)


def test_the_deepseekmoe_exercise_fails_segmentation_without_the_shared_correction():
    def forgets_shared(E, F, k, m, shared):
        return m * E, F // m, m * k, shared * (F // m)
    assert run_check("08.3", forgets_shared)["status"] == "failed"


def test_the_overlap_exercise_fails_an_answer_that_hides_everything():
    assert run_check("09.1", lambda step, pairs: step - sum(e for e, w in pairs))["status"] == "failed"
    assert run_check("09.1", lambda step, pairs: step - sum(w for e, w in pairs))["status"] == "failed"

