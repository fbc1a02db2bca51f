"""Lesson 12: low precision on the wire: the FP8 quantizer, the wire, and the FP8 dispatch against one device."""
import pytest
import torch

from launcher import run_script
from launcher.run import REPO
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.moe.fp8 import FP8_MAX, FakeQuantFP8, dequantize_fp8, quantize_fp8, tile_scales
from lessons_lib.moe.init import init_full_state_dict
from lessons_lib.moe.wire import Fp8Wire

WORKER = REPO / "tests" / "ep_worker.py"
TOLERANCE = 1e-5  # max relative error, fp32 on CPU


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_fp8_dispatch_equals_the_single_device_layer_with_the_same_quantization(nproc):
    r = run_script(WORKER, nproc=nproc, backend="gloo", params={"mode": "fp8_dispatch"}, stream=False,
                   timeout=900).value
    rows = r["rows"]
    cases = 6 if nproc > 1 else 5
    per_dispatcher = 2 * (3 * cases + 1) + 2 * (cases + 1)  # loop, grouped × (configs × routings + top_k=E); fp8
    assert len(rows) == 3 * per_dispatcher + 2 * 3 * 2  # + hierarchical's two node routings
    assert sum(r["experts"] == "fp8" for r in rows) == 3 * 2 * (cases + 1)
    assert {"grad_input", "grad_experts.w1", "grad_router.weight"} <= set(rows[0]["errors"])
    bad = [(r["dispatcher"], r["experts"], r["case"], r["errors"]) for r in rows
           if not all(e <= TOLERANCE for e in r["errors"].values())]
    assert not bad
    if nproc > 1:  # rows that leave the rank: FP8 values and a 4-byte scale per 128 channels, against 2 bytes each
        fp8, bf16 = r["bytes"]["float8_e4m3fn"], r["bytes"]["bfloat16"]
        assert bf16["dispatch"]["sent"] > 0
        assert fp8["dispatch"]["sent"] * 2 * 256 == bf16["dispatch"]["sent"] * (256 + 4 * 2)
        assert fp8["combine"] == bf16["combine"]  # the combine stays in the layer's dtype


def test_quantize_fp8_scales_are_powers_of_two_and_the_error_is_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)
    x[3] = 0.0  # a row of zeros: scale 1, values 0
    x[5, 17] = 5e4  # an outlier channel costs only its own tile
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 2) and scale.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert torch.equal(scale[3], torch.ones(2)) and not q.float()[3].any()
    amax = x.view(64, 2, 128).abs().amax(-1)
    assert (amax / scale <= FP8_MAX).all() and (amax / scale > FP8_MAX / 2)[amax > 0].all()  # the smallest 2^n
    back = dequantize_fp8(q, scale, torch.float32)
    # e4m3 has 3 mantissa bits: every normal value is within 2^-4 of itself; tiny ones within half a subnormal step
    err = (back - x).abs()
    assert (err <= torch.maximum(x.abs() / 16, scale.repeat_interleave(128, 1) * 2.0 ** -10)).all()
    assert scale[5, 0] > 64 * scale[5, 1] or scale[5, 1] == scale[5, 0]  # the outlier's tile has its own scale
    assert torch.isfinite(back).all()


def test_fp8_round_trip_is_idempotent_so_a_second_hop_changes_nothing():
    x = torch.randn(32, 384, generator=torch.Generator().manual_seed(1)) * 7
    once = dequantize_fp8(*quantize_fp8(x), torch.float32)
    twice = dequantize_fp8(*quantize_fp8(once), torch.float32)
    assert torch.equal(once, twice)
    wire = Fp8Wire(384, torch.float32)
    payload = wire.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (32, 384 + 4 * 3) and wire.row_bytes == 396
    assert torch.equal(wire.decode(payload), once)


def test_fake_quant_is_straight_through():
    x = torch.randn(4, 128, requires_grad=True)
    g = torch.randn(4, 128)
    y = FakeQuantFP8.apply(x)
    y.backward(g)
    assert torch.equal(x.grad, g) and not torch.equal(y, x)


def test_fp8_dispatch_config_errors():
    with pytest.raises(ValueError, match="multiple of 128"):
        MoEConfig(hidden_dim=64, dispatch_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="dispatch_dtype must be one of"):
        MoEConfig(hidden_dim=128, dispatch_dtype="float8_e5m2")
    with pytest.raises(ValueError, match="tile"):
        tile_scales(torch.zeros(2, 100), 128)


def test_fp8_dispatch_changes_the_single_device_output_by_a_bounded_amount():
    kw = dict(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=128, activation="swiglu")
    exact, fp8 = MoELayer(MoEConfig(**kw)), MoELayer(MoEConfig(**kw, dispatch_dtype="float8_e4m3fn"))
    sd = init_full_state_dict(MoEConfig(**kw))
    exact.load_full_state_dict(sd)
    fp8.load_full_state_dict(sd)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    y, y8 = exact(x)[0], fp8(x)[0]
    rel = ((y8 - y).norm() / y.norm()).item()
    assert 1e-3 < rel < 0.05, rel  # quantized (not a no-op), within e4m3's few percent


def test_with_quantization_off_no_quantizer_runs(monkeypatch):
    """dispatch_dtype None and an unquantized bank: the layer runs exactly the code of lessons 03-11, no FP8 step."""
    import lessons_lib.moe.dispatch_local as local
    from lessons_lib.moe import fp8, wire

    def refuse(*args, **kwargs):
        raise AssertionError("a quantizer ran with quantization off")

    class Refused:
        apply = staticmethod(refuse)

    monkeypatch.setattr(fp8, "quantize_fp8", refuse)
    monkeypatch.setattr(fp8, "fused_quantize_fp8", refuse)
    monkeypatch.setattr(wire, "fused_quantize_fp8", refuse)
    monkeypatch.setattr(local, "FakeQuantFP8", Refused)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=128, ffn_dim=64, activation="swiglu")
    assert wire.wire_for(cfg) is None
    layer = MoELayer(cfg, experts="grouped")
    layer.load_full_state_dict(init_full_state_dict(cfg))
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(9), requires_grad=True)
    layer(x)[0].sum().backward()
    assert x.grad.abs().sum() > 0
