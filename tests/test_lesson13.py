"""Lesson 13: the FP8 expert bank (its emulation, its serving path, the GPU's row kernel) and the FP4 (MXFP4) bank."""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.fp8 import dequantize_fp8, quantize_fp8
from lessons_lib.moe.init import init_full_state_dict

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


def test_fp8_bank_emulation_is_the_scaled_product():
    """out = (q_x · q_w) · s_x[m] · s_w[n] per expert, rows scaled row-wise and weights column-wise."""
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_dim=32, ffn_dim=16)
    layer = MoELayer(cfg, experts="fp8")
    layer.load_full_state_dict(init_full_state_dict(cfg))
    bank = layer.experts
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    sizes = [3, 4]
    y = bank(x, torch.tensor(sizes), sizes)
    assert "emulated" in bank.path
    expected = []
    for e, x_e in enumerate(x.split(sizes)):
        q_x, s_x = quantize_fp8(x_e, 32)
        w1 = bank.w1.detach()[e]
        q_w, s_w = quantize_fp8(w1.t().contiguous(), 32)  # a scale per output column, over H
        h = torch.nn.functional.gelu((q_x.float() @ q_w.float().t()) * s_x * s_w.t())
        q_h, s_h = quantize_fp8(h, 16)
        w2 = bank.w2.detach()[e]
        q_w2, s_w2 = quantize_fp8(w2.t().contiguous(), 16)
        expected.append((q_h.float() @ q_w2.float().t()) * s_h * s_w2.t())
    torch.testing.assert_close(y, torch.cat(expected), rtol=1e-6, atol=1e-6)


def test_fp8_bank_quantizes_its_weights_once_until_they_change():
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_dim=32, ffn_dim=16)
    bank = MoELayer(cfg, experts="fp8").experts
    first = bank.quantized_weights("w1")
    assert bank.quantized_weights("w1") is first
    with torch.no_grad():
        bank.w1.mul_(2)  # what an optimizer step does
    again = bank.quantized_weights("w1")
    assert again is not first and torch.equal(again[1], first[1] * 2)


def test_fp8_bank_refuses_a_tensor_parallel_slice():
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_dim=32, ffn_dim=16)
    from lessons_lib.moe.experts_fp8 import Fp8Experts
    with pytest.raises(ValueError, match="tensor-parallel"):
        Fp8Experts(cfg, range(2), slice(0, 8))


def test_fp8_bank_serving_path_computes_what_the_training_path_computes():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=64, ffn_dim=32, activation="swiglu")
    layer = MoELayer(cfg, experts="fp8")
    layer.load_full_state_dict(init_full_state_dict(cfg))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        served = layer(x)[0]
    assert torch.equal(served, layer(x)[0].detach())


def test_fp4_quantizer_uses_the_e2m1_grid_and_one_scale_per_block_of_32():
    from lessons_lib.moe.fp4 import E2M1, dequantize_fp4, quantize_fp4

    w = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(5))
    w[0, :32, 0] = 0.0  # a block of zeros
    codes, exponents = quantize_fp4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 64, 4) and exponents.shape == (3, 2, 8)
    back = dequantize_fp4(codes, exponents, torch.float32)
    scale = torch.exp2(exponents.float()).repeat_interleave(32, dim=1)
    on_grid = (back / scale).abs().unsqueeze(-1) == E2M1
    assert on_grid.any(-1).all()  # every value is ±e2m1 · its block's scale
    assert not back[0, :32, 0].any()
    amax = w.abs().view(3, 2, 32, 8).amax(2)
    assert ((amax / torch.exp2(exponents.float()) >= 4) | (amax == 0)).all()  # the block's max lands in [4, 8)
    assert (amax / torch.exp2(exponents.float()) < 8).all()
    # the nearest grid value: the error is at most half a grid step at the value's magnitude (steps 0.5, 1, 2)
    # beyond 6 (a block's max can reach up to 8) the value saturates at ±6
    scaled = (w / scale).abs()
    step = torch.where(scaled < 2, 0.5, torch.where(scaled < 4, 1.0, 2.0))
    inside = scaled <= 6
    assert ((back - w).abs() <= step * scale / 2 + 1e-6)[inside].all()
    assert torch.equal(back[~inside], 6 * scale[~inside] * w[~inside].sign())
    assert (~inside).any()  # this draw has saturating values, so the rule above is exercised


def test_fp4_packing_round_trips_every_code():
    from lessons_lib.moe.fp4 import E2M1, dequantize_fp4, quantize_fp4

    values = torch.cat([E2M1, -E2M1[1:], torch.tensor([0.0])])  # the 15 values of e2m1, and 0 again
    w = values.view(16, 1).repeat(2, 16)  # [K=32, N=16]: every column holds every value, max 6 -> exponent 0
    codes, exponents = quantize_fp4(w)
    assert (exponents == 0).all()
    assert set((codes & 15).flatten().tolist()) | set((codes >> 4).flatten().tolist()) == set(range(16)) - {8}
    assert torch.equal(dequantize_fp4(codes, exponents, torch.float32), w)


def test_fp4_bank_frozen_holds_about_a_quarter_of_bf16_and_computes_the_same():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=64, ffn_dim=64, activation="swiglu", dtype="bfloat16")
    layer = MoELayer(cfg, experts="fp4")
    layer.load_full_state_dict(init_full_state_dict(cfg))
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    before = layer.experts.weight_bytes()
    with torch.no_grad():
        training_output = layer(x)[0]
        layer.experts.freeze()
        served = layer(x)[0]
    assert torch.equal(served, training_output)
    assert layer.experts.weight_bytes() / before == (0.5 + 1 / 32) / 2  # 4.25 bits against 16
    assert not list(layer.experts.parameters())


def test_fp4_bank_output_error_is_bounded_and_its_gradient_is_straight_through():
    kw = dict(num_experts=4, top_k=2, hidden_dim=64, ffn_dim=64, activation="swiglu")
    sd = init_full_state_dict(MoEConfig(**kw))
    exact, fp4 = MoELayer(MoEConfig(**kw)), MoELayer(MoEConfig(**kw), experts="fp4")
    exact.load_full_state_dict(sd)
    fp4.load_full_state_dict(sd)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(7))
    y, y4 = exact(x)[0], fp4(x)[0]
    rel = ((y4 - y).norm() / y.norm()).item()
    assert 0.03 < rel < 0.4, rel  # 4-bit weights: visibly off, not wrong
    y4.sum().backward()
    assert fp4.experts.w13.grad is not None and fp4.experts.w13.grad.abs().sum() > 0


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_fp4_bank_with_and_without_fp8_dispatch_under_ep_equals_itself_on_one_device(nproc):
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "fp4_bank"}, stream=False,
                   timeout=600).value
    assert len(r) == 2 * 6
    bad = [(row["dispatcher"], row["case"], row["errors"]) for row in r
           if not all(e <= TOLERANCE for e in row["errors"].values())]
    assert not bad


def test_fp4_bank_refuses_misaligned_sizes_and_tensor_parallel_slices():
    from lessons_lib.moe.experts_fp4 import Fp4Experts

    with pytest.raises(ValueError, match="multiples of 32"):
        Fp4Experts(MoEConfig(num_experts=2, top_k=1, hidden_dim=48, ffn_dim=64), range(2))
    with pytest.raises(ValueError, match="tensor-parallel"):
        Fp4Experts(MoEConfig(num_experts=2, top_k=1, hidden_dim=64, ffn_dim=64), range(2), slice(0, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass row kernel runs on a GPU (Triton)")
def test_fp8_row_kernel_equals_the_plain_quantizer_on_a_gpu():
    from lessons_lib.moe.fp8_rows_kernel import rows_to_fp8, usable

    x = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    x[:, ::1000] *= 50
    x[3] = 0
    assert usable(x)
    q, s = rows_to_fp8(x)
    q0, s0 = quantize_fp8(x, 7168)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0.squeeze(1))
    h = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16) * 3
    # the kernel rounds as the eager ops do (each op's result to bf16); the bank's compiled SwiGLU keeps silu(a) in
    # fp32 before the product, so it is not the reference here
    h1, h3 = h[:, :2048], h[:, 2048:]  # swiglu: x·w1 and x·w3 are the halves of x·w13
    for act, eager in (("swiglu", torch.nn.functional.silu(h1) * h3), ("gelu", torch.nn.functional.gelu(h1))):
        q, s = rows_to_fp8(h1, h3 if act == "swiglu" else None, act)
        q0, s0 = quantize_fp8(eager.contiguous(), 2048)
        assert (q.view(torch.uint8) == q0.view(torch.uint8)).float().mean() > 0.999  # exp/erf: last-bit differences
        torch.testing.assert_close(dequantize_fp8(q, s.unsqueeze(1), torch.float32),
                                   dequantize_fp8(q0, s0, torch.float32), rtol=0.07, atol=1e-3)


def test_fp4_bank_leaves_the_shared_expert_unrounded():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=64, ffn_dim=64, activation="swiglu", shared_ffn_dim=96)
    sd = init_full_state_dict(cfg)
    fp4 = MoELayer(cfg, experts="fp4")
    fp4.load_full_state_dict(sd)
    fp4.experts.freeze()
    shared = {k: v for k, v in fp4.state_dict().items() if k.startswith("shared.")}
    assert shared and all(torch.equal(v, sd[k]) for k, v in shared.items())
    # the same layer with exact experts that hold the FP4-rounded weights: only the routed experts were rounded
    rounded = dict(sd)
    rounded["experts.w13"], rounded["experts.w2"] = fp4.experts.weights()
    exact = MoELayer(cfg, experts="grouped")
    exact.load_full_state_dict(rounded)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(fp4(x)[0], exact(x)[0], rtol=1e-6, atol=1e-6)
        unrounded = MoELayer(cfg, experts="grouped")
        unrounded.load_full_state_dict(sd)
        assert not torch.allclose(fp4(x)[0], unrounded(x)[0], rtol=1e-3, atol=1e-3)  # the rounding is there


def test_expert_weight_bytes_by_format():
    from lessons_lib.course.exercises import EXERCISES

    ref = EXERCISES["13.2"].reference
    values = 3 * 7168 * 2048
    assert ref(7168, 2048, 3, "bf16") == 2 * values
    assert ref(7168, 2048, 3, "fp8") == values + 4 * values // 16384
    assert ref(7168, 2048, 3, "mxfp4") == values // 2 + values // 32  # 4.25 bits a value
