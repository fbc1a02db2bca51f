import pytest

from lessons_lib.lab.comm_model import at_world_size, ep_bytes_per_rank, ep_moves_less, tp_bytes_per_rank


def test_formulas_by_hand():
    # EP: 2 · T·k·H·b · (N−1)/N ; TP: 2 · (N−1)/N · T·H·b
    assert ep_bytes_per_rank(tokens=10, hidden=4, top_k=2, group_size=2, bytes_per_element=2) == 2 * 10 * 2 * 4 * 2 / 2
    assert tp_bytes_per_rank(tokens=10, hidden=4, group_size=4, bytes_per_element=4) == 2 * 3 / 4 * 10 * 4 * 4
    assert ep_bytes_per_rank(10, 4, 2, 1) == 0 and tp_bytes_per_rank(10, 4, 1) == 0


def test_the_worked_example_128_tokens_32_gpus():
    h = 1000
    r = at_world_size(global_tokens=128, world_size=32, parallel_size=8, hidden=h, top_k=2)
    assert r["tp"]["dp"] == 4 and r["tp"]["tokens_per_rank"] == 32  # TP = 8 -> DP = 4 -> 32 tokens
    assert r["ep"]["dp"] == 32 and r["ep"]["tokens_per_rank"] == 4  # EP = 8, DP = 32 -> 4 tokens
    # the course's rounded numbers are these with (N−1)/N = 7/8 set to 1: 128h and 16h·k bytes
    assert r["tp"]["bytes"] == pytest.approx(128 * h * 7 / 8)
    assert r["ep"]["bytes"] == pytest.approx(16 * h * 2 * 7 / 8)


@pytest.mark.parametrize("top_k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("parallel_size", [2, 4, 8, 16])
def test_crossover_rule_matches_the_formulas(top_k, parallel_size):
    r = at_world_size(global_tokens=4096, world_size=64, parallel_size=parallel_size, hidden=512, top_k=top_k)
    assert r["ep"]["bytes"] / r["tp"]["bytes"] == pytest.approx(top_k / parallel_size)
    assert ep_moves_less(top_k, parallel_size) == (r["ep"]["bytes"] < r["tp"]["bytes"])


def test_parallel_size_must_divide_world_size():
    with pytest.raises(ValueError, match="divide"):
        at_world_size(128, 32, 6, 10, 2)
