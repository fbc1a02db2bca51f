"""What FP8 buys on one GPU (lesson 13): the expert GEMMs and the quantization of the dispatch rows.

At one EP = 8 rank's share of DeepSeek-V3's MoE (32 experts × 1024 rows, H 7168, F 2048, bf16), on one GPU:
- `gemm_rates`: one grouped GEMM [32768, 7168] x [32, 7168, 2048], bf16 `torch._grouped_mm` against FP8
  `torch._scaled_grouped_mm` (weights and rows already quantized): the kernels alone;
- `bank_forwards`: the course's `GroupedExperts` against `Fp8Experts`, SwiGLU, forward, the quantization of the
  rows (both GEMMs' inputs) included, the weights quantized once beforehand: as when serving (no autograd, so
  the FP8 bank's activation writes FP8 directly), and with autograd recording, as in training; the kernel's
  fast and exact accumulation; how far the FP8 kernel's output is from the bank's emulation and from bf16;
- `quantizer_times`: quantizing the [32768, 7168] dispatch rows, one scale per row and one per 128 channels,
  with the plain PyTorch ops and fused by torch.compile (checked bit for bit against the plain ops), one scale
  per row also with the bank's one-pass Triton kernel (`fp8_rows_kernel`, checked in `row_kernel_checks`), next
  to the floor: the bytes read and written at the copy bandwidth measured in the same run.
CUDA events around 5 calls back to back (the host launching ahead, as in a model), median of 10 such samples;
the bank forward also with the events around each single call (`synchronized_each_call`).

    python -m lessons_lib.lab.fp8_speed --out images/fp8_1xh200.json   (GPU; --plot redraws the figure)
"""
from __future__ import annotations

import torch

from ..moe.config import MoEConfig
from ..moe.experts_batched import flops_per_row
from ..moe.experts_fp8 import Fp8Experts, activate_and_quantize, quantize_columns, quantize_rows
from ..moe.fp8 import fused_quantize_fp8, quantize_fp8
from ..moe.fp8_rows_kernel import rows_to_fp8
from .granularity import bank_on_device, time_ms
from .records import record_arguments, record_header, redraw_record, write_record

SHAPE = {"num_experts": 32, "rows_per_expert": 1024, "hidden_dim": 7168, "ffn_dim": 2048}


BACK_TO_BACK = 5  # calls between the CUDA events of one sample: the host launches ahead, as in a model


def gpu_ms(fn) -> float:
    return time_ms(fn, calls=BACK_TO_BACK)


def _rows(device, rows: int, hidden: int) -> torch.Tensor:
    return torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)


def gemm_rates(shape=SHAPE) -> dict:
    device = torch.device("cuda")
    E, m, H, F = (shape[k] for k in ("num_experts", "rows_per_expert", "hidden_dim", "ffn_dim"))
    x = _rows(device, E * m, H)
    w = torch.randn(E, H, F, device=device, dtype=torch.bfloat16) / H ** 0.5
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * m
    q_x, s_x = quantize_rows(x)
    q_wt, s_w = quantize_columns(w)
    flops = 2 * E * m * H * F
    bf16 = gpu_ms(lambda: torch._grouped_mm(x, w, offs=offs))
    fp8 = gpu_ms(lambda: torch._scaled_grouped_mm(q_x, q_wt.transpose(-2, -1), s_x, s_w, offs=offs,
                                                  out_dtype=torch.bfloat16))
    fast = gpu_ms(lambda: torch._scaled_grouped_mm(q_x, q_wt.transpose(-2, -1), s_x, s_w, offs=offs,
                                                   out_dtype=torch.bfloat16, use_fast_accum=True))
    out = {"bf16_ms": bf16, "bf16_tflops": flops / bf16 / 1e9, "fp8_ms": fp8, "fp8_tflops": flops / fp8 / 1e9,
           "fp8_fast_accum_ms": fast, "fp8_fast_accum_tflops": flops / fast / 1e9}
    print("GEMM alone", out, flush=True)
    return out


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bank_forwards(shape=SHAPE) -> dict:
    device = torch.device("cuda")
    E, m, H, F = (shape[k] for k in ("num_experts", "rows_per_expert", "hidden_dim", "ffn_dim"))
    cfg = MoEConfig(num_experts=E, top_k=2, hidden_dim=H, ffn_dim=F, activation="swiglu", dtype="bfloat16")
    bf16 = bank_on_device(cfg, device).to(device)
    fp8 = bank_on_device(cfg, device, Fp8Experts).to(device)
    for name in ("w13", "w2"):
        getattr(fp8, name).data.copy_(getattr(bf16, name).data)
    x = _rows(device, E * m, H)
    sizes = [m] * E
    counts = torch.tensor(sizes, device=device)
    with torch.no_grad():  # serving: the FP8 bank's activation writes FP8 directly
        y_bf16, y_fp8 = bf16(x, counts, sizes), fp8(x, counts, sizes)  # also quantizes fp8's weights, once
        path = fp8.path
        fp8.fast_accum = False
        y_exact_accum = fp8(x, counts, sizes)
        t_fp8_exact_accum = gpu_ms(lambda: fp8(x, counts, sizes))
        fp8.fast_accum = True
        fp8.emulate = True
        y_emulated = fp8(x, counts, sizes)
        fp8.emulate = False
        t_bf16, t_fp8 = gpu_ms(lambda: bf16(x, counts, sizes)), gpu_ms(lambda: fp8(x, counts, sizes))
        synced = {"bf16_ms": time_ms(lambda: bf16(x, counts, sizes)), "fp8_ms": time_ms(lambda: fp8(x, counts, sizes))}
        # where the time goes: the rows' quantization and the activation, alone
        h = torch.randn(E * m, 2 * F, device=device, dtype=torch.bfloat16)
        parts = {"quantize rows [M, H]": gpu_ms(lambda: quantize_rows(x)),
                 "activation alone": gpu_ms(lambda: torch.nn.functional.silu(h[:, :F]) * h[:, F:]),
                 "activation and quantization, fused": gpu_ms(lambda: activate_and_quantize(h[:, :F], h[:, F:],
                                                                                            "swiglu"))}
    # training: the forward with autograd recording (the activation written in bf16, kept for the backward)
    t_fp8_train, t_bf16_train = gpu_ms(lambda: fp8(x, counts, sizes)), gpu_ms(lambda: bf16(x, counts, sizes))

    flops = E * m * flops_per_row(cfg)
    out = {"bf16_ms": t_bf16, "bf16_tflops": flops / t_bf16 / 1e9, "fp8_ms": t_fp8, "fp8_tflops": flops / t_fp8 / 1e9,
           "speedup": t_bf16 / t_fp8, "fp8_exact_accum_ms": t_fp8_exact_accum,
           "speedup_exact_accum": t_bf16 / t_fp8_exact_accum, "fp8_path": path, "bf16_path": bf16.path,
           "synchronized_each_call": synced | {"speedup": synced["bf16_ms"] / synced["fp8_ms"]},
           "training_forward": {"bf16_ms": t_bf16_train, "fp8_ms": t_fp8_train, "speedup": t_bf16_train / t_fp8_train},
           "kernel_vs_emulation_rel_error": _rel(y_fp8, y_emulated),
           "kernel_exact_accum_vs_emulation_rel_error": _rel(y_exact_accum, y_emulated),
           "fp8_vs_bf16_rel_error": _rel(y_fp8, y_bf16), "parts_ms": parts}
    print("bank forward", out, flush=True)
    return out


def _same_bytes(a, b) -> float:
    """The fraction of equal bytes of two FP8 tensors."""
    return (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()


def row_kernel_checks(rows: int = SHAPE["num_experts"] * SHAPE["rows_per_expert"], hidden: int = SHAPE["hidden_dim"],
                      ffn: int = SHAPE["ffn_dim"]) -> dict:
    """`fp8_rows_kernel` against the plain ops: bf16 rows with outlier channels (quantize alone: the same bytes and
    scales expected), and the activations before quantizing (the kernel's exp and erf may differ from torch's in
    the last bit, which the bf16 rounding almost always hides): the fraction of equal bytes, equal scales."""
    from ..moe.experts import activate
    device = torch.device("cuda")
    x = _rows(device, rows, hidden)
    x[:, :: hidden // 7] *= 50  # a few outlier channels
    x[0] = 0  # a row of zeros
    q, s = rows_to_fp8(x)
    q0, s0 = quantize_fp8(x, hidden)
    out = {"quantize": {"equal_bytes": _same_bytes(q, q0), "equal_scales": bool(torch.equal(s, s0.squeeze(1)))}}
    h = _rows(device, rows, 2 * ffn) * 3
    for act in ("swiglu", "gelu"):
        h_act = h if act == "swiglu" else h[:, :ffn]  # swiglu: x·w1 and x·w3 side by side
        h1, h3 = (h[:, :ffn], h[:, ffn:]) if act == "swiglu" else (h_act, None)
        q, s = rows_to_fp8(h1, h3, act)
        q0, s0 = quantize_fp8(activate(h_act, act).contiguous(), ffn)
        out[act] = {"equal_bytes": _same_bytes(q, q0),
                    "equal_scales_fraction": (s == s0.squeeze(1)).float().mean().item()}
    print("row kernel against the plain ops", out, flush=True)
    return out


def quantizer_times(rows: int = SHAPE["num_experts"] * SHAPE["rows_per_expert"],
                    hidden: int = SHAPE["hidden_dim"]) -> dict:
    device = torch.device("cuda")
    x = _rows(device, rows, hidden)
    copy = gpu_ms(lambda: x.clone())
    bandwidth = 2 * x.numel() * 2 / copy / 1e6  # GB/s (copy in ms): read and write every byte
    out = {"copy_ms": copy, "copy_GB_per_s": bandwidth, "tiles": {}}
    for name, tile in (("per 128 channels", 128), ("per row", hidden)):
        q, s = quantize_fp8(x, tile)
        fq, fs = fused_quantize_fp8(x, tile)  # compiles on the first call
        moved = x.numel() * 2 + q.numel() + s.numel() * 4
        out["tiles"][name] = {
            "plain_ms": gpu_ms(lambda: quantize_fp8(x, tile)),
            "fused_ms": gpu_ms(lambda: fused_quantize_fp8(x, tile)),
            "floor_ms": moved / bandwidth / 1e6,
            "fused_equals_plain": bool(torch.equal(q.view(torch.uint8), fq.view(torch.uint8)) and torch.equal(s, fs))}
        if tile == hidden:
            out["tiles"][name]["row_kernel_ms"] = gpu_ms(lambda: rows_to_fp8(x))
        print("quantize", name, out["tiles"][name], flush=True)
    return out


def backward_check(shape=SHAPE, rows_per_expert: int = 256) -> dict:
    """The FP8 bank's straight-through backward with torch's grouped GEMM kernel against the same with the
    emulation's loop of mm: relative error of the input's and each weight's gradient (bf16)."""
    device = torch.device("cuda")
    E, H, F = shape["num_experts"], shape["hidden_dim"], shape["ffn_dim"]
    cfg = MoEConfig(num_experts=E, top_k=2, hidden_dim=H, ffn_dim=F, activation="swiglu", dtype="bfloat16")
    bank = bank_on_device(cfg, device, Fp8Experts).to(device)
    sizes = [rows_per_expert] * E
    counts = torch.tensor(sizes, device=device)
    x = _rows(device, E * rows_per_expert, H).requires_grad_()
    g = _rows(device, E * rows_per_expert, H)
    grads = []
    for emulate in (False, True):
        bank.emulate = emulate
        grads.append(torch.autograd.grad(bank(x, counts, sizes), [x, bank.w13, bank.w2], g))
    bank.emulate = False
    out = {name: _rel(a, b) for name, a, b in zip(("input", "w13", "w2"), *grads)}
    print("backward, kernel vs emulation", out, flush=True)
    return out


def layer_check() -> dict:
    """World size 1 over NCCL: the FP8 dispatch (fused quantizer, uint8 payload) through 'allgather', 'alltoall'
    and 'hierarchical', with the grouped and FP8 banks, against the single-device layer with the same
    quantization, fp32: worst relative error of outputs and gradients."""
    import torch.distributed as dist

    from .equivalence import compare_with_single_device
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29534", rank=0, world_size=1)
    device = torch.device("cuda")
    out = {}
    for dispatcher in ("allgather", "alltoall", "hierarchical"):
        for bank in ("grouped", "fp8"):
            cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=128, activation="swiglu",
                            shared_ffn_dim=64, dispatch_dtype="float8_e4m3fn")
            errors = compare_with_single_device(cfg, dispatcher, bank, tokens_per_rank=[64], device=device,
                                                ranks_per_node=1 if dispatcher == "hierarchical" else None)
            out[f"{dispatcher}/{bank}"] = max(errors.values())
    print("layer against single device", out, flush=True)
    return out


def plot_record(record: dict):
    """Two panels: the GEMM and the bank forward in TFLOP/s, bf16 against FP8; the quantizer's times against the
    floor. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    g, k = record["gemm"], record["bank_forward"]
    labels = ["grouped GEMM alone", "bank forward\n(SwiGLU, quantizing included)"]
    series = (("bf16", "tab:blue", [g["bf16_tflops"], k["bf16_tflops"]]),
              ("FP8, fast accumulation", "tab:orange", [g["fp8_fast_accum_tflops"], k["fp8_tflops"]]))
    for i, (label, color, vals) in enumerate(series):
        bars = a.bar([j + 0.38 * i for j in range(2)], vals, width=0.36, color=color, label=label)
        a.bar_label(bars, fmt="%.0f", fontsize=8)
    a.set_xticks([0.19, 1.19], labels, fontsize=8)
    a.set_ylabel("TFLOP/s")
    a.set_title("32 experts × 1024 rows, H 7168, F 2048", fontsize=9)
    a.set_ylim(0, 1.3 * max(max(vals) for _, _, vals in series))
    a.legend(fontsize=8, loc="upper left")
    tiles = record["quantizer"]["tiles"]
    names = list(tiles)
    kinds = {"plain_ms": ("plain ops", "tab:gray"), "fused_ms": ("torch.compile", "tab:green"),
             "row_kernel_ms": ("Triton, one pass a row", "tab:purple"), "floor_ms": ("bytes / copy bandwidth", "k")}
    for i, (key, (label, color)) in enumerate(kinds.items()):
        xs = [j + 0.2 * i for j, n in enumerate(names) if key in tiles[n]]
        bars = b.bar(xs, [tiles[n][key] for n in names if key in tiles[n]], width=0.19, color=color, label=label)
        b.bar_label(bars, fmt="%.2f", fontsize=7)
    b.set_xticks([j + 0.3 for j in range(len(names))], names, fontsize=8)
    b.set_ylabel("ms")
    b.set_title("quantizing [32768, 7168] bf16 rows to FP8", fontsize=9)
    b.legend(fontsize=8)
    fig.suptitle(f"{record['device']}, torch {record['torch']}", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    a = record_arguments(__doc__.splitlines()[0], "images/fp8_1xh200.json", argv)
    if a.plot:
        return redraw_record(a.out, plot_record)
    device = torch.device("cuda")
    record = record_header("lessons_lib.lab.fp8_speed", device, argv, torchrun=False) | {"shape": SHAPE}
    record["quantizer"] = quantizer_times()
    record["row_kernel_vs_plain"] = row_kernel_checks()
    record["gemm"] = gemm_rates()
    record["bank_forward"] = bank_forwards()
    record["backward_kernel_vs_emulation"] = backward_check()
    record["layer_vs_single_device_fp32"] = layer_check()
    write_record(record, a.out, plot_record)


if __name__ == "__main__":
    main()
