"""The benchmark suite: every lesson's layer, timed next to the limits of the machine it runs on.

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.bench --shape small --out images/bench_small.json
    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.bench --shape realistic --out ...
    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.bench --shape scaling --dispatchers alltoall \
        --experts grouped

Runs on any number of ranks (the world size comes from torchrun), CPU/gloo or GPU/nccl; `make bench` runs the
small shape on 2 CPU processes. Shapes (`shapes`): small (the published notebook's setting), realistic
(DeepSeek-V3-like), scaling (the realistic shape at 1k … 16k tokens per rank).
For each dispatcher × expert bank it measures, on every rank's own random tokens (balanced routing):
  fwd_bwd_ms     forward + backward, median over steps of the slowest rank (CUDA events on a GPU);
  train_step_ms  forward + backward + fused AdamW (small shape only), next to its floor: the AdamW update
                 alone + the dense FFN below (no training step of the layer can be faster);
  phases_ms      the forward split into route / dispatch / experts / combine (median, slowest rank);
  tokens_per_s, tflops_per_gpu (expert + router FLOPs, ×3 for forward + backward), mfu (dense bf16 peak);
  bytes sent per rank in dispatch and combine (counted by the dispatcher) and their bandwidth;
  peak_mem_gb    the most memory allocated during forward + backward (GPU);
  device_time    (GPU) one pass split into grouped GEMM kernels, other kernels and device idle, passes queued
                 back to back (`profile.device_time_by_part`);
  grouped_gemms_at_counts_ms  (fast grouped GEMM only) the expert GEMMs alone at the group sizes this run's
                 routing gave, alternating with equal groups of the same rows (grouped_gemms_equal_ms).
And, where transformers is installed and computes the same function (the softmax top-k router, SwiGLU), the
peer a user would pick instead: its Qwen3-MoE block with grouped_mm experts, same shape and weights (`peers`).
At the small shape on a GPU it also times the final layer with lesson 05's static shapes, eagerly and replayed
from one CUDA graph per training step (`graph_times.step_times`).
And, in the same run, the limits: all_to_all_single bus bandwidth at the dispatch's size, a dense FFN of the
same FLOPs (one big GEMM chain instead of many experts), and the expert GEMMs alone on rows already grouped
(`limits.grouped_gemms_ms`: the six grouped GEMM kernels alone, and the bank's math under autograd). Writes a
JSON record, a markdown table beside it, and plots.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.experts_batched import flops_per_row, grouped_mm_support
from ..moe.layer import MoELayer
from .limits import adamw_ms, alltoall_bus_bandwidth, collective_latency, dense_ffn_ms, equal_split, grouped_gemms_ms
from .profile import device_time_by_part
from .records import record_header
from .shapes import SHAPES
from .timing import make_adamw, median, timed_runs

DENSE_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0}  # bf16 dense, SXM parts only (PCIe and NVL parts are lower)


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The GPU's dense bf16 peak, for MFU; None on a CPU, an unlisted GPU, or another dtype (an fp32
    layer measured against the bf16 peak would say little)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:
        return None
    return next((v for k, v in DENSE_PEAK_TFLOPS.items() if k in name), None)


def _max_over_ranks(values: list[float], device, group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def forward_phases(layer: MoELayer, x: torch.Tensor, steps: int, warmup: int = 3) -> dict:
    """Median ms of each step of the layer's forward (`MoELayer.route`, `.dispatch`, `.run_experts`, `.combine`),
    the slowest rank's per step."""
    device = x.device
    cuda = device.type == "cuda"

    def mark(marks):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    per_step = []
    for i in range(warmup + steps):
        dist.barrier()
        marks = []
        mark(marks)
        routing = layer.route(x)
        mark(marks)
        rows_MH, counts_L, state = layer.dispatch(x, routing)
        mark(marks)
        out_MH = layer.run_experts(rows_MH, counts_L, state)
        mark(marks)
        layer.combine(out_MH, state)
        mark(marks)
        if cuda:
            torch.cuda.synchronize(device)
        ms = [a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        if i >= warmup:
            per_step.append(ms)
    medians = [median([s[j] for s in per_step]) for j in range(4)]
    return dict(zip(("route", "dispatch", "experts", "combine"), _max_over_ranks(medians, device)))


def layer_flops(cfg: MoEConfig, tokens: int) -> int:
    """Forward FLOPs per rank, balanced routing, dropless: the router's [T, H]·[H, E] and k expert rows per token."""
    return 2 * tokens * cfg.hidden_dim * cfg.num_experts + tokens * cfg.top_k * flops_per_row(cfg)


def bench_one(layer: MoELayer, dispatcher: str, experts: str, tokens: int, steps: int, warmup: int,
              train_step: bool) -> dict:
    """Every measurement of one layer (`dispatcher` × `experts`) at one size (all ranks call it together)."""
    cfg, device = layer.cfg, layer.device
    rank, N = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    grad = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    xg = x.requires_grad_()

    def fwd_bwd():
        # fresh gradients each pass, as in training: accumulating into the last pass's would add a read
        # and a write of every expert weight's gradient (GBs at the realistic shape)
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        y, _ = layer(xg)
        y.backward(grad)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out = {"dispatcher": dispatcher, "experts": experts, "tokens_per_rank": tokens,
           "fwd_bwd_ms": median(timed_runs(fwd_bwd, steps, warmup, device))}
    if device.type == "cuda":
        out["peak_mem_gb"] = max(_max_over_ranks([torch.cuda.max_memory_allocated(device) / 1e9], device))
        out["weights_gb"] = sum(p.numel() * p.element_size() for p in layer.parameters()) / 1e9
        out["device_time"] = device_time_by_part(fwd_bwd, device)
    if grouped_mm_support(device, cfg.torch_dtype, cfg)[0]:
        # the same six GEMMs at the group sizes this run's routing gives (rows per expert held here): unequal
        # groups fill the kernel's row tiles less well than the equal groups of `limits`
        with torch.no_grad():
            _, counts_L, _ = layer.dispatch(x.detach(), layer.route(x.detach()))
        sizes = counts_L.tolist()
        out["expert_rows"] = {"min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)}
        # alternating with equal groups of the same rows, so that both see the GPU in the same state (its clock
        # drifts over a run by more than the difference)
        rows, equal, at_counts = sum(sizes), [], []
        for _ in range(3):
            equal.append(grouped_gemms_ms(cfg, rows, device, steps, warmup=2, sizes=equal_split(rows, len(sizes))))
            at_counts.append(grouped_gemms_ms(cfg, rows, device, steps, warmup=2, sizes=sizes))
        out["grouped_gemms_equal_ms"], out["grouped_gemms_at_counts_ms"] = median(equal), median(at_counts)
    if train_step:
        opt = make_adamw(layer.parameters())

        def step():
            fwd_bwd()
            opt.step()

        out["train_step_ms"] = median(timed_runs(step, steps, warmup, device))
        del opt
    with torch.no_grad():
        out["phases_ms"] = forward_phases(layer, x.detach(), steps)
    t = layer.dispatcher.traffic.phases
    sent = _max_over_ranks([t[p].sent if p in t else 0 for p in ("dispatch", "combine")], device)
    out["bytes_sent"] = {"dispatch": sent[0], "combine": sent[1]}
    for p, b in zip(("dispatch", "combine"), sent):
        out[f"{p}_gbps"] = b / out["phases_ms"][p] / 1e6 if b else None
    flops = 3 * layer_flops(cfg, tokens)  # forward + backward per rank
    out["tokens_per_s"] = tokens * N / out["fwd_bwd_ms"] * 1e3
    out["us_per_token"] = out["fwd_bwd_ms"] * 1e3 / tokens
    out["tflops_per_gpu"] = flops / out["fwd_bwd_ms"] / 1e9
    peak = peak_tflops(device, cfg.torch_dtype)
    out["mfu"] = out["tflops_per_gpu"] / peak if peak else None
    out["path"] = layer.experts.path
    return out


def limits(cfg: MoEConfig, tokens: int, device, steps: int, train_step: bool = False) -> dict:
    """The machine's limits at this size: all-to-all bus bandwidth at the dispatch's bytes, dense FFN rate;
    with `train_step`, also the AdamW update of a rank's share of the layer alone. A training step takes at
    least AdamW + the dense FFN (every EP layer holds the same E/N experts, so one AdamW floor serves all).
    On a CPU, also what one collective of the dispatch's size costs after compute (`limits.collective_latency`)."""
    rows = tokens * cfg.top_k
    held = equal_split(rows, cfg.num_experts // (dist.get_world_size() if dist.is_initialized() else 1))
    a2a = alltoall_bus_bandwidth(rows * cfg.hidden_dim * cfg.torch_dtype.itemsize, device, steps)
    ms = dense_ffn_ms(cfg, rows, device, steps=steps, warmup=3)  # with the input's gradient, as bench_one
    out = {"alltoall": a2a, "dense_ffn_fwd_bwd_ms": ms, "dense_ffn_tflops": 3 * rows * flops_per_row(cfg) / ms / 1e9,
           # the experts' GEMMs alone on grouped rows (None without a fast grouped GEMM): what the layer adds is
           # its time minus these. A rank holds E/N experts, and balanced, they receive T·k rows in all
           "grouped_gemms_ms": grouped_gemms_ms(cfg, rows, device, steps, warmup=3, sizes=held),
           "expert_bank_alone_ms": grouped_gemms_ms(cfg, rows, device, steps, warmup=3, with_activation=True,
                                                    sizes=held)}
    if train_step:
        out["adamw_ms"] = adamw_ms(MoELayer(cfg, "alltoall", "grouped").to(device), steps, warmup=3)
        out["step_floor_ms"] = out["adamw_ms"] + ms
    if device.type == "cpu":  # on a CPU every collective of a step also waits for the ranks' processes to wake
        out["collective"] = collective_latency(rows * cfg.hidden_dim * cfg.torch_dtype.itemsize, device)
    return out


def memory_table(cfg: MoEConfig, tokens: int, N: int) -> dict:
    """What forward + backward of the final layer allocates per rank (GB), from the shapes: the expert
    weights and their gradients, a few [T·k, H] row buffers and the activations saved for backward.
    Nothing grows with experts × ranks × tokens (the published notebook allocates [E/N, T·N, H] twice)."""
    b = cfg.torch_dtype.itemsize
    E_local, H, F, rows = cfg.num_experts // N, cfg.hidden_dim, cfg.ffn_dim, tokens * cfg.top_k
    swiglu = cfg.activation == "swiglu"
    mats = 3 if swiglu else 2
    saved, saved_widths = ("x·w13 (2F wide), act", 3) if swiglu else ("x·w1, act", 2)
    if N == 1:  # nothing is sent: the rows are gathered once and come out of the experts once
        rows_what, copies = "dispatched, expert output (one rank sends nothing)", 2
    else:
        rows_what, copies = "sent, received, regrouped, expert output, back in received order, returned", 6
    return {
        f"expert weights (E/N · {mats} · H · F)": E_local * mats * H * F * b / 1e9,
        "their gradients": E_local * mats * H * F * b / 1e9,
        f"token rows [T·k, H]: {rows_what} ({copies} buffers)": copies * rows * H * b / 1e9,
        f"expert activations saved for backward [T·k, F]: {saved}": saved_widths * rows * F * b / 1e9,
        "input, output and its gradient [T, H]": 3 * tokens * H * b / 1e9,
    }


def main(argv=None) -> None:
    from .profile import profile_step
    from .timing import keep_freed_memory
    from .torchrun import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dispatchers", nargs="+", default=["allgather", "alltoall"])
    ap.add_argument("--experts", nargs="+", default=["loop", "bmm", "grouped"])
    ap.add_argument("--tokens", type=int, nargs="+", help="tokens per rank (default: the shape's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the shape's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true", help="leave out transformers' block")
    ap.add_argument("--out", help="JSON record path; a .md table and .png plots go beside it")
    ap.add_argument("--profile", help="also profile training steps of the last combination; write the tables here")
    ap.add_argument("--trace", help="with --profile: a Chrome trace of 3 forward + backward passes, here")
    args = ap.parse_args(argv)

    device = init_from_torchrun("lessons_lib.lab.bench")
    if device.type == "cpu":
        keep_freed_memory()
    cfg, sizes = SHAPES[args.shape]
    cfg = replace(cfg, dtype=args.dtype) if args.dtype else cfg
    sizes = args.tokens or sizes
    rank, N = dist.get_rank(), dist.get_world_size()
    record = {**record_header("lessons_lib.lab.bench", device, argv), "shape": args.shape, "config": vars(cfg).copy(),
              "peak_tflops": peak_tflops(device, cfg.torch_dtype), "runs": [], "limits": {}}
    train_step = args.shape == "small"
    for tokens in sizes:
        record["limits"][str(tokens)] = limits(cfg, tokens, device, args.steps, train_step)
    if not args.no_peer and N == 1:  # the peer holds every expert: like for like on one device only
        from ..moe.init import init_full_state_dict
        from .peers import peer_ms

        sd = {k: v.to(device) for k, v in init_full_state_dict(cfg).items()}
        record["peers"] = {str(t): peer_ms(cfg, sd, t, device, args.steps, args.warmup) for t in sizes}
        del sd
    for d in args.dispatchers:
        for e in args.experts:
            layer = MoELayer(cfg, d, e).to(device)  # built once: a realistic layer takes seconds to draw
            for tokens in sizes:
                run = bench_one(layer, d, e, tokens, args.steps, args.warmup, train_step)
                record["runs"].append(run)
                if rank == 0:
                    print(json.dumps(run), flush=True)
            del layer
    if train_step and device.type == "cuda" and "alltoall" in args.dispatchers and "grouped" in args.experts:
        from .graph_times import step_times  # lesson 05: static shapes, one CUDA graph per step

        record["cuda_graph"] = {str(t): step_times(cfg, t, device, args.steps, args.warmup) for t in sizes}
    record["memory_estimate_gb"] = memory_table(cfg, max(sizes), N)
    if args.profile:
        profile_step(cfg, sizes[0], args.dispatchers[-1], args.experts[-1], device, args.profile, trace=args.trace)
    if rank == 0:
        print(markdown(record))
        if args.out:
            out = Path(args.out)
            out.write_text(json.dumps(record, indent=1))
            out.with_suffix(".md").write_text(markdown(record))
            plot(record, out.with_suffix(".png"))
    leave_torchrun()


def markdown(record: dict) -> str:
    """The record as a markdown table, with its device, torch version, date and command."""
    lines = [f"{record['device']} × {record['world_size']} ({record['backend']}), torch {record['torch']}, "
             f"{record['date']}, shape {record['shape']}", f"`{record['command']}`", ""]
    lines += [f"*Corrected after the run:* {c}\n" for c in record.get("corrections", [])]
    header = ["dispatcher", "experts", "tokens/rank", "fwd+bwd ms", "step ms", "step floor ms", "µs/token",
              "TFLOP/s/GPU", "MFU", "route / dispatch / experts / combine ms (fwd)", "dispatch GB/s", "combine GB/s",
              "a2a busbw GB/s", "dense FFN TFLOP/s", "peak GB", "× GEMMs alone", "× GEMMs at its counts",
              "peer ms / this"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in record["runs"]:
        lim = record["limits"][str(r["tokens_per_rank"])]
        p = r["phases_ms"]
        lines.append(
            f"| {r['dispatcher']} | {r['experts']} | {r['tokens_per_rank']} | {r['fwd_bwd_ms']:.3g} | "
            f"{fmt(r.get('train_step_ms'), '.3g')} | {fmt(lim.get('step_floor_ms'), '.3g')} | "
            f"{r['us_per_token']:.3g} | {r['tflops_per_gpu']:.3g} | "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '.0f')}{'%' if r['mfu'] else ''} | "
            f"{p['route']:.3g} / {p['dispatch']:.3g} / {p['experts']:.3g} / {p['combine']:.3g} | "
            f"{fmt(r['dispatch_gbps'], '.3g')} | {fmt(r['combine_gbps'], '.3g')} | "
            f"{fmt(lim['alltoall']['busbw_gbps'], '.3g')} | {lim['dense_ffn_tflops']:.3g} | "
            f"{fmt(r.get('peak_mem_gb'), '.3g')} | {fmt(ratio(r['fwd_bwd_ms'], lim.get('grouped_gemms_ms')), '.2f')} | "
            f"{fmt(ratio(r['fwd_bwd_ms'], r.get('grouped_gemms_at_counts_ms')), '.2f')} | "
            f"{fmt(ratio(peer_of(record, r), r['fwd_bwd_ms']), '.2f')} |")
    timed = [r for r in record["runs"] if "device_time" in r]
    if timed:
        lines += ["", "Where the device's time goes, forward + backward passes queued back to back (no host sync "
                  "between; `profile.device_time_by_part`), ms per pass:", "",
                  "| dispatcher | experts | tokens/rank | queued (unprofiled) | profiled: grouped GEMM kernels + "
                  "other kernels + device idle = span | GEMMs alone (same run): equal groups / the routing's "
                  "(rows per expert) | largest other ops |", "|" + "---|" * 7]
        for r in timed:
            d, rows = r["device_time"], r.get("expert_rows")
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(d["top_ops"].items())[:4])
            counts = f" ({rows['min']}-{rows['max']})" if rows else ""
            lines.append(f"| {r['dispatcher']} | {r['experts']} | {r['tokens_per_rank']} | {d['queued_ms']:.3g} | "
                         f"{d['grouped_gemm_ms']:.3g} + {d['other_ms']:.3g} + {d['idle_ms']:.2f} = "
                         f"{d['span_ms']:.3g} | {fmt(r.get('grouped_gemms_equal_ms'), '.3g')} / "
                         f"{fmt(r.get('grouped_gemms_at_counts_ms'), '.3g')}{counts} | {top} |")
    for t, lim in record["limits"].items():
        if lim.get("grouped_gemms_ms") is not None:
            peer = record.get("peers", {}).get(t, {})
            lines += ["", f"At {t} tokens per rank, the expert GEMMs alone on rows already grouped take "
                      f"{lim['grouped_gemms_ms']:.3g} ms (the bank's math under autograd, the activation included: "
                      f"{lim['expert_bank_alone_ms']:.3g} ms), the dense FFN of the same FLOPs "
                      f"{lim['dense_ffn_fwd_bwd_ms']:.3g} ms"
                      + (f"; {peer['name']} (transformers {peer['transformers']}), same weights: "
                         f"{peer['fwd_bwd_ms']:.3g} ms" if "fwd_bwd_ms" in peer else "") + " (`limits`, `peers`)."]
    for t, lim in record["limits"].items():
        if "collective" in lim:
            c = lim["collective"]
            lines += ["", f"One all_to_all_single of the dispatch's size ({c['bytes_per_rank'] / 1024:.0f} KiB per "
                      f"rank, {t} tokens per rank) takes {c['back_to_back_ms']:.2f} ms back to back. When the ranks "
                      f"come from the same computation, as at each collective of a training step, it takes "
                      f"{c['after_compute_ms']:.2f} ms at the median and {c['after_compute_p90_ms']:.2f} ms at the "
                      f"90th percentile, from the last rank's arrival; the ranks arrived "
                      f"{c['arrival_spread_ms']:.2f} ms "
                      f"apart (median; `limits.collective_latency`)."]
    for t, g in record.get("cuda_graph", {}).items():
        lines += ["", f"Lesson 05's static shapes, alltoall + grouped, {t} tokens per rank: every expert padded to "
                  f"C = {g['capacity']} rows per rank (nothing dropped, {100 * g['padding_fraction']:.0f}% of the rows "
                  f"are empty slots). Training step: {g['dropless_eager_ms']:.3g} ms dropless, "
                  f"{g['static_eager_ms']:.3g} ms static, **{g['graph_ms']:.3g} ms static and replayed from one CUDA "
                  f"graph** (`lessons_lib.lab.graph_times`)."]
    lines += ["", "What forward + backward allocates per rank, from the shapes at the largest size (not all of it is "
              "alive at once; the measured peak is in the table above). Nothing grows with experts × ranks × "
              "tokens:", "",
              "| what | GB |", "|---|---|"]
    lines += [f"| {k} | {v:.3g} |" for k, v in record["memory_estimate_gb"].items()]
    return "\n".join(lines) + "\n"


def ratio(a, b):
    return a / b if a is not None and b else None


def peer_of(record: dict, run: dict) -> float | None:
    """The peer's fwd+bwd ms at this run's size (None if it was not run)."""
    return record.get("peers", {}).get(str(run["tokens_per_rank"]), {}).get("fwd_bwd_ms")


def show_bench(name: str, dispatchers=None, experts=None) -> dict | None:
    """In a lesson: the committed record images/NAME.json as a table (only the given dispatchers and
    banks, if any) and its plot. Returns the record, or None (with a note) if it is not committed."""
    from IPython.display import Markdown, display

    from .figures import IMAGES, show_image

    path = IMAGES / f"{name}.json"
    if not path.is_file():
        print(f"{path.name} is not committed yet: run `python -m lessons_lib.lab.bench` on GPUs (see its docstring)")
        return None
    record = json.loads(path.read_text())
    shown = dict(record, runs=[r for r in record["runs"] if (dispatchers is None or r["dispatcher"] in dispatchers)
                               and (experts is None or r["experts"] in experts)])
    display(Markdown(markdown(shown)))
    if path.with_suffix(".png").is_file():
        show_image(path.with_suffix(".png").name)
    return record


def layer_rates(record: dict, dispatchers) -> tuple[dict, float]:
    """In a lesson (04): each run of a record at its largest size, TFLOP/s per GPU and MFU next to the dense FFN of
    the same FLOPs measured in the same run. Returns ({(dispatcher, bank): run}, the dense FFN's TFLOP/s)."""
    c, tokens = record["config"], max(r["tokens_per_rank"] for r in record["runs"])
    dense = record["limits"][str(tokens)]["dense_ffn_tflops"]
    print(f"{record['device']} x {record['world_size']}, torch {record['torch']}, {record['date']}: "
          f"{c['num_experts']} experts ({c['num_experts'] // record['world_size']} per GPU), top-{c['top_k']}, hidden "
          f"{c['hidden_dim']}, FFN {c['ffn_dim']}, {c['dtype']}, {tokens} tokens per rank; "
          f"dense FFN {dense:.0f} TFLOP/s")
    for note in record.get("corrections", []):
        print("correction:", note)
    runs = {}
    for r in record["runs"]:
        if r["dispatcher"] in dispatchers and r["tokens_per_rank"] == tokens:
            runs[r["dispatcher"], r["experts"]] = r
            print(f"    {r['dispatcher']:8s} + {r['experts']:8s} {r['tflops_per_gpu']:4.0f} TFLOP/s per GPU, "
                  f"MFU {r['mfu']:.0%} of {record['peak_tflops']:.0f}, "
                  f"{r['tflops_per_gpu'] / dense:.0%} of the dense FFN")
    return runs, dense


def plot(record: dict, path) -> None:
    """TFLOP/s per GPU of each combination next to the dense FFN; forward phases; time per token vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    sizes = sorted({r["tokens_per_rank"] for r in runs})
    lim = record["limits"][str(sizes[-1])]
    with_limits = lim.get("grouped_gemms_ms") is not None  # one panel more: time against the GEMMs and the peer
    big = [r for r in runs if r["tokens_per_rank"] == sizes[-1]]
    with_parts = with_limits and all("device_time" in r for r in big)  # and one more: where the device's time goes
    panels = 3 + with_limits + with_parts
    fig, axes = plt.subplots(1, panels, figsize=(5.3 * panels, 4))
    names = [f"{r['dispatcher']}\n{r['experts']}" for r in big]
    axes[0].bar(names, [r["tflops_per_gpu"] for r in big], color="C0")
    axes[0].axhline(record["limits"][str(sizes[-1])]["dense_ffn_tflops"], color="C3", ls="--",
                    label="dense FFN, same FLOPs (same run)")
    if record["peak_tflops"]:
        axes[0].axhline(record["peak_tflops"], color="grey", ls=":", label="dense peak")
    axes[0].set(ylabel="TFLOP/s per GPU (fwd+bwd)", title=f"{sizes[-1]} tokens per rank")
    axes[0].legend(fontsize=8)
    bottom = [0.0] * len(big)
    for phase, colour in zip(("route", "dispatch", "experts", "combine"), ("C7", "C1", "C2", "C4")):
        vals = [r["phases_ms"][phase] for r in big]
        axes[1].bar(names, vals, bottom=bottom, label=phase, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set(ylabel="ms (forward, slowest rank per phase)", title="where the forward goes")
    axes[1].legend(fontsize=8)
    if len(sizes) > 1:  # scaling: time per token should stay flat as tokens grow
        for d, e in sorted({(r["dispatcher"], r["experts"]) for r in runs}):
            pts = [(r["tokens_per_rank"], r["us_per_token"]) for r in runs if (r["dispatcher"], r["experts"]) == (d, e)]
            axes[2].plot(*zip(*pts), marker="o", label=f"{d} + {e}")
        axes[2].set(xscale="log", xlabel="tokens per rank", ylabel="µs per token (fwd+bwd)", title="time per token")
        axes[2].set_ylim(bottom=0)
    else:  # one size: the dispatch and combine phases' bandwidth against the all-to-all's
        xs = range(len(big))
        axes[2].bar([x - 0.2 for x in xs], [r["dispatch_gbps"] or 0 for r in big], 0.4, label="dispatch phase")
        axes[2].bar([x + 0.2 for x in xs], [r["combine_gbps"] or 0 for r in big], 0.4, label="combine phase")
        busbw = record["limits"][str(sizes[-1])]["alltoall"]["busbw_gbps"]
        if busbw:
            axes[2].axhline(busbw, color="C3", ls="--", label="all_to_all_single alone (same run)")
        axes[2].set_xticks(list(xs), names)
        axes[2].set(ylabel="GB/s sent to other ranks", title="dispatch / combine bandwidth")
    axes[2].legend(fontsize=8)
    if with_limits:
        ax = axes[3]
        ax.bar(names, [r["fwd_bwd_ms"] for r in big], color="C0", label="the layer")
        ax.axhline(lim["grouped_gemms_ms"], color="C2", ls="--", label="the expert GEMMs alone")
        ax.axhline(lim["expert_bank_alone_ms"], color="C2", ls=":", label="the bank's math alone (autograd)")
        peer = peer_of(record, big[0])
        if peer:
            ax.axhline(peer, color="C3", ls="-.", label="transformers' Qwen3-MoE block (grouped_mm)")
        ax.set(ylabel="ms (fwd+bwd)", title=f"against its GEMMs and the peer, {sizes[-1]} tokens")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    if with_parts:
        ax = axes[4]
        bottom = [0.0] * len(big)
        for part, label, colour in (("grouped_gemm_ms", "grouped GEMM kernels", "C2"),
                                    ("other_ms", "other kernels", "C1"), ("idle_ms", "device idle", "C7")):
            vals = [max(0.0, r["device_time"][part]) for r in big]
            ax.bar(names, vals, bottom=bottom, color=colour, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axhline(big[0].get("grouped_gemms_equal_ms", lim["grouped_gemms_ms"]), color="C2", ls="--",
                   label="GEMMs alone, equal groups")
        at_counts = big[0].get("grouped_gemms_at_counts_ms")
        if at_counts:
            ax.axhline(at_counts, color="k", ls=":", label="GEMMs alone, the routing's group sizes")
        ax.set(ylabel="ms per pass (profiled, queued back to back)", title="where the device's time goes")
        ax.set_ylim(0, 1.45 * max(bottom))
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(f"{record['device']} × {record['world_size']}, {record['backend']}, torch {record['torch']}, "
                 f"{record['date']}: shape {record['shape']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
