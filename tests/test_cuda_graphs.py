"""Lesson 05's static shapes, all the way to a CUDA graph: the layer they give computes the dropless
layer, its all-to-all path inside a graph equals the single-device layer with no host read, and (on a
GPU) replayed training steps equal eager ones."""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.equivalence import adversarial_inputs, relative_error
from lessons_lib.moe.capacity import expert_capacity, padding_fraction, static_dropless
from lessons_lib.moe.cuda_graph import GraphedTrainStep
from lessons_lib.moe.experts import LoopExperts
from lessons_lib.moe.experts_batched import GroupedExperts

WORKER = REPO / "tests" / "graph_worker.py"
TOLERANCE = 1e-5


@pytest.mark.parametrize("routing", ["random", "one_expert"])
@pytest.mark.parametrize("cfg", [MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32),
                                 MoEConfig(num_experts=6, top_k=4, hidden_dim=16, ffn_dim=32, activation="swiglu",
                                           norm_topk_prob=False)])
def test_static_dropless_layer_computes_the_dropless_layer(cfg, routing):
    T = 12
    static = static_dropless(cfg)
    assert expert_capacity(static, T) == T and static.pad_to_capacity
    sd, X, G = adversarial_inputs(cfg, [T], routing, 1)
    results = []
    for c in (cfg, static):
        layer = MoELayer(c)
        layer.load_full_state_dict(sd)
        x = X.clone().requires_grad_()
        y, aux = layer(x)
        (y * G).sum().backward()
        results.append((y, x.grad, layer.router.weight.grad, layer.experts.weights()[0].grad, aux))
    (y0, gx0, gr0, gw0, _), (y1, gx1, gr1, gw1, aux) = results
    assert int(aux.dropped) == 0
    for a, b in ((y1, y0), (gx1, gx0), (gr1, gr0), (gw1, gw0)):
        assert relative_error(a, b) <= TOLERANCE
    if routing == "one_expert":  # every token to one expert: it still takes them all
        assert int(aux.tokens_per_expert.max()) == T


def test_padding_fraction_counts_the_empty_slots():
    cfg = static_dropless(MoEConfig(num_experts=16, top_k=2))
    assert padding_fraction(cfg, 32) == 1 - 2 * 32 / (16 * 32)  # 7/8 of what is sent and computed is padding


def test_grouped_bank_runs_equal_groups_as_one_bmm():
    cfg = MoEConfig(num_experts=3, hidden_dim=8, ffn_dim=16, activation="swiglu")
    grouped, loop = GroupedExperts(cfg, range(3)), LoopExperts(cfg, range(3))
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(12, 8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [grouped(xs[0], torch.tensor([4, 4, 4]), [4, 4, 4]), loop(xs[1], torch.tensor([4, 4, 4]))]
    assert grouped.path.startswith("bmm of equal groups")
    for o in outs:
        o.square().sum().backward()
    assert relative_error(outs[0], outs[1]) <= TOLERANCE
    assert relative_error(xs[0].grad, xs[1].grad) <= TOLERANCE
    for name in ("w13", "w2"):
        assert relative_error(getattr(grouped, name).grad, getattr(loop, name).grad) <= TOLERANCE
    grouped(x, torch.tensor([5, 3, 4]), [5, 3, 4])  # unequal groups: one mm per group
    assert grouped.path.startswith("grouped GEMM as a loop of mm")


def test_graphed_step_refuses_a_cpu_layer_and_a_dropless_one():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(MoELayer(static_dropless(MoEConfig())), torch.zeros(4, 64), torch.zeros(4, 64))


@pytest.mark.parametrize("nproc", [2, 4])
def test_alltoall_inside_a_graph_needs_no_host_read_and_equals_the_single_device_layer(nproc):
    every = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "capture_path"}, stream=False,
                       timeout=600).value
    for r in every:
        assert len(r["equality"]) == 2 * 3 * (4 if nproc > 1 else 3)
        bad = [(row["case"], row["errors"]) for row in r["equality"]
               if not all(e <= TOLERANCE for e in row["errors"].values())]
        assert not bad
        assert r["host_reads"] == "none"
        assert r["traffic_kept"]
        assert r["path"].startswith("bmm of equal groups")
        assert "pad_to_capacity=True" in r["dropless"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graph_replays_equal_eager_training_steps():
    every = run_script(WORKER, nproc=torch.cuda.device_count(), backend="nccl", params={"mode": "graph"},
                       stream=False, timeout=600).value
    for r in every:
        for bank, errors in r.items():
            assert errors["loss"] <= TOLERANCE and errors["weights"] <= TOLERANCE, (bank, errors)
