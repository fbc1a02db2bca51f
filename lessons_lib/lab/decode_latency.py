"""Decode against prefill: the MoE layer's time per step from 1 to 16k tokens per rank (lesson 15).

Measured in one run, for the same layer (the all-to-all dispatcher, the grouped bank, no autograd):
  - `decode_times`: per-layer time of a decode step against tokens per rank, for the dynamic all-to-all (count
    exchange + host read of the split sizes), lesson 05's static shapes run by `static_decode.StaticDecode`
    (worst-case buffers, no count exchange, no host read) and, on a GPU, the same replayed from a CUDA graph;
    beside them, one all_to_all_single of the step's rows alone and the expert bank alone on those rows;
  - `prefill_times`: tokens per second of the layer on 512 to 16k tokens per rank;
  - `two_batch_times.two_batch_times` (lesson 09): the layer whole, and as two micro-batches with and without
    overlap (`two_batch`), kept in this record for the GPU;
  - `static_buffer_bytes`: what the worst-case buffers hold, against the dynamic path's typical and worst use.

`python -m lessons_lib.lab.decode_latency --out images/decode_1xh200.json` (under torchrun) writes the record
and its plot; lesson 15 runs the same functions on CPU ranks.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from ..model.transformer import ModelConfig
from ..moe.capacity import static_dropless
from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.layer import MoELayer
from ..moe.static_decode import StaticDecode
from ..moe.two_batch import two_batch_forward
from .equivalence import compare_generation, relative_error
from .progress import Progress
from .records import record_arguments, record_header, redraw_record, write_record
from .timing import median, timed_runs
from .two_batch_times import two_batch_times

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
# One rank's share of DeepSeek-V3 at EP = 8 (256 routed experts / 8 ranks; top-8, H 7168, expert F 2048, one
# shared expert), held whole on one GPU: at world size 1 the layer sees what one rank of EP 8 sees.
GPU_SHAPE = MoEConfig(num_experts=32, top_k=8, hidden_dim=7168, ffn_dim=2048, activation="swiglu",
                      shared_ffn_dim=2048, dtype="bfloat16")


def _x(cfg: MoEConfig, tokens: int, device, seed: int = 0) -> torch.Tensor:
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    return torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)


def _ms(fn, steps: int, warmup: int, device, group) -> float:
    return median(timed_runs(fn, steps, warmup, device, group))


def alltoall_ms(rows: int, cfg: MoEConfig, device, steps: int = 20, warmup: int = 5, group=None) -> float:
    """One all_to_all_single of `rows` rows of the layer's width, split evenly over the group: the exchange alone."""
    _, N = rank_and_size(group)
    rows = -(-rows // N) * N
    send = torch.randn(rows, cfg.hidden_dim, device=device).to(cfg.torch_dtype)
    recv = torch.empty_like(send)
    return _ms(lambda: dist.all_to_all_single(recv, send, group=group), steps, warmup, device, group)


def bank_ms(layer: MoELayer, rows: int, steps: int = 20, warmup: int = 5) -> float:
    """The layer's expert bank alone on `rows` rows spread evenly over its local experts (what a rank receives
    on average when the T·k rows of every rank are balanced): the expert GEMMs without any dispatch."""
    L = len(layer.dispatcher.experts)
    sizes = [rows // L + (e < rows % L) for e in range(L)]
    x = _x(layer.cfg, rows, layer.device, seed=1)
    counts = torch.tensor(sizes, device=layer.device)
    with torch.no_grad():
        return _ms(lambda: layer.experts(x, counts, sizes), steps, warmup, layer.device, layer.dispatcher.group)


def decode_times(cfg: MoEConfig, tokens=DECODE_TOKENS, device=None, steps: int = 20, warmup: int = 5,
                 group=None, graph: bool | None = None, progress: bool = True) -> list[dict]:
    """Per tokens-per-rank T: ms per layer forward of the dynamic layer, the static one, the static one from a CUDA
    graph (graph: default on CUDA), one all-to-all of T·k rows, and the bank alone on T·k rows. Every rank of
    `group` calls it together."""
    device = torch.device("cpu") if device is None else device
    graph = device.type == "cuda" if graph is None else graph
    dynamic = MoELayer(cfg, "alltoall", "grouped", group).to(device)
    static_layer = MoELayer(static_dropless(cfg), "alltoall", "grouped", group).to(device)
    rows = []
    bar = Progress(len(tokens), "decode: tokens per rank", enabled=progress)
    for T in tokens:
        x = _x(cfg, T, device)
        static = StaticDecode(static_layer, T)
        with torch.no_grad():
            row = {"tokens": T,
                   "dynamic_ms": _ms(lambda: dynamic(x), steps, warmup, device, group),
                   "static_ms": _ms(lambda: static(x), steps, warmup, device, group)}
        if graph:
            replay = StaticDecode(static_layer, T, graph=True)
            row["graph_ms"] = _ms(lambda: replay(x), steps, warmup, device, group)
            del replay
        row["alltoall_ms"] = alltoall_ms(T * cfg.top_k, cfg, device, steps, warmup, group)
        row["bank_ms"] = bank_ms(dynamic, T * cfg.top_k, steps, warmup)
        rows.append(row)
        bar.step(T=T, dynamic=f"{row['dynamic_ms']:.2f} ms")
    bar.close()
    return rows


def prefill_times(cfg: MoEConfig, tokens=PREFILL_TOKENS, device=None, steps: int = 10, warmup: int = 3,
                  group=None, progress: bool = True) -> list[dict]:
    """Per tokens-per-rank T: ms of one layer forward (dynamic all-to-all, grouped bank) and tokens per second."""
    device = torch.device("cpu") if device is None else device
    layer = MoELayer(cfg, "alltoall", "grouped", group).to(device)
    rows = []
    bar = Progress(len(tokens), "prefill: tokens per rank", enabled=progress)
    for T in tokens:
        x = _x(cfg, T, device)
        with torch.no_grad():
            ms = _ms(lambda: layer(x), steps, warmup, device, group)
        rows.append({"tokens": T, "ms": ms, "tokens_per_s": T / ms * 1e3})
        bar.step(T=T, ms=f"{ms:.1f}")
    bar.close()
    return rows


def compute_bound_tokens(num_experts: int, top_k: int, ranks: int, ridge_flops_per_byte: float) -> int:
    """The fewest tokens per rank at which a rank's expert GEMMs are compute-bound (lesson 14): balanced, its
    L = E / N experts get T·k / L rows each, and a bf16 weight (2 bytes) does 2 FLOPs per row, so the GEMMs do
    T·k / L FLOPs per byte of weights read; they are compute-bound from the GPU's ridge (GEMM rate / bandwidth)."""
    local = num_experts // ranks
    return math.ceil(ridge_flops_per_byte * local / top_k)


def decode_floor_ms(tokens: int, top_k: int, num_experts: int, local_experts: int, expert_bytes: int,
                    gb_per_s: float) -> float:
    """The expected time to read, once each, the weights of this rank's experts that a step touches (lesson 15):
    `tokens` tokens over all ranks each pick k of the E experts uniformly, so an expert is untouched with
    probability (1 − k/E)^tokens; at `gb_per_s` (10^9 bytes/s) of memory bandwidth."""
    touched = local_experts * (1 - (1 - top_k / num_experts) ** tokens)
    return touched * expert_bytes / (gb_per_s * 1e9) * 1e3


def static_buffer_bytes(cfg: MoEConfig, tokens: int, ranks: int, dtype_bytes: int = 2) -> dict:
    """The rows (and bytes, of `dtype_bytes` per value) one rank's dispatch buffers hold at `tokens` per rank on
    `ranks` ranks. Static (`StaticDecode`): every expert gets C = T slots from every rank, so a rank sends E·T
    rows and receives L·N·T = E·T, whatever the routing. Dynamic: T·k rows each way when balanced; at worst
    (every rank's tokens all pick this rank's experts) it receives N·T·min(k, L). The combine's buffers are as
    large again."""
    E, k, H, T, N = cfg.num_experts, cfg.top_k, cfg.hidden_dim, tokens, ranks
    if E % N:
        raise ValueError(f"{E} experts do not divide over {N} ranks")
    L = E // N
    rows = {"static_sent": E * T, "static_received": L * N * T, "dynamic_balanced": T * k,
            "dynamic_worst_received": N * T * min(k, L)}
    return {"ranks": N, "local_experts": L, "rows": rows,
            "bytes": {name: r * H * dtype_bytes for name, r in rows.items()}}


def checks(device, group=None) -> dict:
    """On the device of the record, in fp32: the static path eager and from a CUDA graph, and two micro-batches with
    overlap (on a GPU: experts on a side stream beside the exchanges), against the dynamic layer; and the model's
    generation with its MoE layers over the group against one device (`compare_generation`)."""
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=64, ffn_dim=128, activation="swiglu", shared_ffn_dim=64)
    x = _x(cfg, 12, device)
    layer = MoELayer(cfg, "alltoall", "grouped", group).to(device)
    with torch.no_grad():
        whole = layer(x)[0]
    static_layer = MoELayer(static_dropless(cfg), "alltoall", "grouped", group).to(device)
    out = {"static_vs_dynamic": relative_error(StaticDecode(static_layer, 16)(x), whole),
           "two_batch_vs_whole": relative_error(two_batch_forward(layer, x), whole)}
    if device.type == "cuda":
        out["graph_vs_dynamic"] = relative_error(StaticDecode(static_layer, 16, graph=True)(x), whole)
    out["generation"] = compare_generation(ModelConfig(cfg, vocab_size=64, max_seq_len=48), "alltoall", "grouped",
                                           group=group, device=device)
    return out


def plot_record(record: dict):
    """Left: ms per layer against tokens per rank (log-log). Right: tokens per second, decode and prefill."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    decode = record["decode"]
    T = [r["tokens"] for r in decode]
    series = [("dynamic_ms", "dynamic all-to-all (counts + host read)", "o-"),
              ("static_ms", "static shapes (worst-case buffers)", "s-"),
              ("graph_ms", "static, one CUDA graph", "^-"),
              ("alltoall_ms", "one all_to_all_single alone", "k--"),
              ("bank_ms", "expert GEMMs alone", "k:")]
    for key, label, style in series:
        if key in decode[0]:
            left.plot(T, [r[key] for r in decode], style, label=label)
    left.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="ms per MoE layer",
             title="decode step, one MoE layer")
    left.legend(fontsize=8)
    prefill = record["prefill"]
    right.plot(T, [t / r["dynamic_ms"] * 1e3 for t, r in zip(T, decode)], "o-", label="decode, dynamic")
    if "graph_ms" in decode[0]:
        right.plot(T, [t / r["graph_ms"] * 1e3 for t, r in zip(T, decode)], "^-", label="decode, CUDA graph")
    right.plot([r["tokens"] for r in prefill], [r["tokens_per_s"] for r in prefill], "D-", label="prefill")
    right.set(xscale="log", yscale="log", xlabel="tokens per rank per step", ylabel="tokens / s per rank",
              title="the two regimes")
    right.legend(fontsize=8)
    fig.suptitle(f"{record['device']}, world size {record.get('world_size', 1)}, torch {record['torch']}, "
                 f"{record['date']}", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    from .torchrun import init_from_torchrun, leave_torchrun

    a = record_arguments(__doc__.splitlines()[0], "images/decode_1xh200.json", argv)
    if a.plot:
        return redraw_record(a.out, plot_record)
    device = init_from_torchrun("lessons_lib.lab.decode_latency")
    # on CPU ranks, lesson 15's shape
    cfg = GPU_SHAPE if device.type == "cuda" else MoEConfig(num_experts=4 * dist.get_world_size(), top_k=2,
                                                             hidden_dim=256, ffn_dim=256, activation="swiglu")
    main_rank = dist.get_rank() == 0
    record = record_header("lessons_lib.lab.decode_latency", device, argv)
    record["shape"] = {f: getattr(cfg, f) for f in ("num_experts", "top_k", "hidden_dim", "ffn_dim", "activation",
                                                     "shared_ffn_dim", "dtype")}
    record["checks_fp32"] = checks(device)
    record["decode"] = decode_times(cfg, device=device, progress=main_rank)
    record["prefill"] = prefill_times(cfg, device=device, progress=main_rank)
    # two micro-batches (lesson 09) of the routed layer: a shared expert would run beside the first half only
    record["two_batch"] = two_batch_times(dataclasses.replace(cfg, shared_ffn_dim=None), [256, 4096], device=device)
    if main_rank:
        write_record(record, a.out, plot_record)
    leave_torchrun()


if __name__ == "__main__":
    main()
