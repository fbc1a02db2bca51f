"""The batched banks equal the loop bank (fp32 CPU, ≤ 1e-5), padding FLOPs are counted exactly."""
import pytest
import torch

from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.equivalence import relative_error
from lessons_lib.moe.experts import LoopExperts
from lessons_lib.moe.experts_batched import BmmExperts, GroupedExperts, flops_per_row, grouped_mm_support

COUNTS = {
    "balanced": [4, 4, 4, 4],
    "uneven": [5, 1, 0, 2],
    "with empty groups": [0, 7, 0, 3],
    "all in one group": [0, 0, 11, 0],
    "no rows at all": [0, 0, 0, 0],
}


@pytest.fixture
def uninitialised_memory_is_nan():
    """Deterministic mode fills every torch.empty with NaN: a gradient slice a bank forgot to write then fails
    the comparison instead of passing by chance with whatever the allocator returned."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("bank, reference_kernel",
                         [(BmmExperts, False), (GroupedExperts, True), (GroupedExperts, False)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("input_grad", [True, False])  # a layer's first bank input may need no gradient
def test_bank_equals_the_loop_in_outputs_and_gradients(bank, reference_kernel, activation, case, input_grad,
                                                       uninitialised_memory_is_nan):
    cfg = MoEConfig(num_experts=4, hidden_dim=8, ffn_dim=16, activation=activation, seed=2)
    counts = torch.tensor(COUNTS[case])
    x = torch.randn(int(counts.sum()), 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn_like(x)
    results = []
    for cls in (LoopExperts, bank):
        b = cls(cfg, range(4))
        b.use_reference_kernel = reference_kernel  # grouped: torch._grouped_mm itself, or the loop of mm a CPU runs
        xi = x.clone().requires_grad_(input_grad)
        y = b(xi, counts)
        (y * g).sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in b.named_parameters()}
        results.append((y, xi.grad if xi.grad is not None else torch.zeros_like(x), grads))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    assert y1.shape == y0.shape
    if bank is GroupedExperts:
        equal = len(set(COUNTS[case])) == 1  # equal groups take one bmm where there is no grouped GEMM kernel
        expected = ("torch._grouped_mm (reference kernel)" if reference_kernel else
                    "bmm of equal groups" if equal else "grouped GEMM as a loop of mm")
        assert b.path.startswith(expected), b.path
    assert relative_error(y1, y0) <= 1e-5 and relative_error(gx1, gx0) <= 1e-5
    for name in gw0:
        assert relative_error(gw1[name], gw0[name]) <= 1e-5, name


def test_bmm_counts_its_padding_flops():
    cfg = MoEConfig(num_experts=4, hidden_dim=8, ffn_dim=16, activation="swiglu")
    bank = BmmExperts(cfg, range(4))
    bank(torch.randn(11, 8), torch.tensor([0, 7, 1, 3]))  # padded to 4 x 7 = 28 rows
    assert flops_per_row(cfg) == 2 * 8 * 16 * 3
    assert bank.useful_flops == 11 * flops_per_row(cfg)
    assert bank.padding_flops == (28 - 11) * flops_per_row(cfg)
    bank(torch.randn(8, 8), torch.tensor([2, 2, 2, 2]))
    assert bank.padding_flops == 0


def test_grouped_bank_says_which_path_it_took():  # by default a CPU runs the grouped GEMM as a loop of mm
    cfg = MoEConfig(num_experts=2, hidden_dim=8, ffn_dim=8)
    bank = GroupedExperts(cfg, range(2))
    assert bank.path == "not run yet"
    bank(torch.randn(3, 8), torch.tensor([1, 2]))
    ok, why = grouped_mm_support(torch.device("cpu"), torch.float32, cfg)
    assert not ok and bank.path == f"grouped GEMM as a loop of mm: {why}"


def test_grouped_bank_falls_back_when_its_tensor_parallel_slice_is_misaligned(monkeypatch):
    monkeypatch.setattr(GroupedExperts, "use_reference_kernel", True)
    cfg = MoEConfig(num_experts=2, hidden_dim=16, ffn_dim=12, activation="swiglu")  # F aligned (fp32: 4)...
    bank = GroupedExperts(cfg, range(2), ffn_slice=slice(0, 6))  # ...but a TP rank's 6 columns are not
    loop = LoopExperts(cfg, range(2), ffn_slice=slice(0, 6))
    loop.load_state_dict(bank.state_dict())
    x, counts = torch.randn(5, 16), torch.tensor([2, 3])
    torch.testing.assert_close(bank(x, counts), loop(x, counts))  # the grouped GEMM would have raised
    assert bank.path.startswith("grouped GEMM as a loop of mm") and "(6)" in bank.path


@pytest.mark.parametrize("experts", ["bmm", "grouped"])
def test_layer_with_each_bank_matches_the_loop_layer(experts, monkeypatch):
    monkeypatch.setattr(GroupedExperts, "use_reference_kernel", True)
    cfg = MoEConfig(num_experts=8, top_k=3, hidden_dim=16, ffn_dim=32, activation="swiglu")
    x = torch.randn(40, 16)
    y_loop, _ = MoELayer(cfg, experts="loop")(x)
    layer = MoELayer(cfg, experts=experts)
    y, _ = layer(x)
    assert relative_error(y, y_loop) <= 1e-5
    expected = {"bmm": BmmExperts.path, "grouped": "torch._grouped_mm (reference kernel)"}[experts]
    assert layer.experts.path == expected




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bank", ["loop", "bmm", "grouped"])
def test_bf16_banks_on_gpu_stay_within_the_documented_tolerance(bank):
    from lessons_lib.lab.bench_experts import BF16_TOLERANCE, bf16_errors

    measured = bf16_errors(bank, torch.device("cuda"))
    print(bank, measured)
    assert max(measured["errors"].values()) <= BF16_TOLERANCE, measured


def test_relative_error_never_lets_a_nan_pass():
    b = torch.ones(3)
    assert relative_error(torch.tensor([1.0, float("nan"), 1.0]), b) == float("inf")
    assert relative_error(torch.tensor([1.0, float("inf"), 1.0]), b) == float("inf")
    assert relative_error(torch.tensor([1.0, 1.5, 1.0]), b) == 0.5
    with pytest.raises(ValueError, match="shapes"):
        relative_error(torch.ones(2), b)
