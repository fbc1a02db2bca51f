"""Does the shared expert hide the dispatch? Step times with and without overlap, and a timeline of both ranks
drawn from torch.profiler (lesson 09).

`overlap_step_times` times the same layer, from the same weights and inputs, with `overlap` on and off, the two
interleaved round by round (so a machine that slows down mid-run slows both), next to what bounds the gain,
measured in the same run: the dispatch's all-to-all alone and the shared expert alone. It makes the GPU records
(`images/overlap_*.json`, training steps with AdamW); lesson 09's own measurement, step by step against its model
and on an emulated link on CPU ranks, is `overlap_saving`.

`profile_step` records one training step with torch.profiler and turns its Chrome trace into bars: the layer's
phases on the rank's own thread (`label_phases` names them with `record_function`; a backward op is given its
forward op's phase through the profiler's sequence numbers), gloo's collectives on gloo's worker threads, and on
a GPU every stream's kernels, each named by the phase of the op that launched it; on an `EmulatedLink`, each
exchange from its start to the end of its wait for the link. `draw_timeline` puts both ranks' bars on one time
axis.

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.overlap_timeline --out images/overlap_cpu.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.init import init_full_state_dict
from ..moe.layer import MoELayer
from .records import record_header
from .timing import keep_freed_memory, make_adamw, median, timed_runs, train_step_times

PHASES = ("route", "dispatch", "shared expert", "experts", "combine")
COLORS = {"route": "tab:purple", "dispatch": "tab:orange", "shared expert": "tab:green", "experts": "tab:blue",
          "combine": "tab:red", "all-to-all": "black", "link": "dimgray", "optimizer": "tab:gray"}


def _labeled(name: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return run


def label_phases(layer: MoELayer) -> MoELayer:
    """Name the layer's steps in a profile: wraps this instance's route, dispatch, run_experts and combine, and
    its shared expert's forward, in `record_function` ranges named after PHASES (the class is left as it is)."""
    for phase, method in zip(PHASES, ("route", "dispatch", None, "run_experts", "combine")):
        if method is not None:
            setattr(layer, method, _labeled(phase, getattr(layer, method)))
    if layer.shared is not None:
        layer.shared.forward = _labeled("shared expert", layer.shared.forward)
    return layer


def _layers(cfg: MoEConfig, dispatcher: str, experts: str, group, device) -> dict[bool, MoELayer]:
    sd = init_full_state_dict(cfg)
    out = {}
    for overlap in (True, False):
        layer = MoELayer(cfg, dispatcher, experts, group=group, overlap=overlap)
        layer.load_full_state_dict(sd)
        out[overlap] = layer.to(device)
    return out


def overlap_step_times(cfg: MoEConfig, tokens: int, rounds: int = 5, steps: int = 6, warmup: int = 2,
                       dispatcher: str = "alltoall", experts: str = "grouped", group=None, device=None) -> dict:
    """Training-step ms (forward, backward, AdamW; the slowest rank's) with overlap on and off: the median over
    rounds of each round's median, and of each round's difference (the two settings timed back to back), with the
    bounds measured in the same run: the dispatch's all-to-all of this routing alone (its backward sends as many
    rows back, so at most twice that is hidden) and the shared expert's forward and backward alone; and the
    exchange with the shared expert's forward, started together (async_op) and run in turn, which says whether
    this machine can run the two at once at all. Every rank of `group` calls it together; rank 0 prints a line
    per round."""
    if cfg.shared_ffn_dim is None:
        raise ValueError("overlap_step_times needs a shared expert: MoEConfig(shared_ffn_dim=...)")
    if dispatcher != "alltoall":  # the exchange timed alone is read from the all-to-all dispatcher's split sizes
        raise ValueError(f"overlap_step_times times the 'alltoall' dispatcher, got {dispatcher!r}")
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    layers = _layers(cfg, dispatcher, experts, group, device)
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(100 + rank))
    x = x.to(device, cfg.torch_dtype).requires_grad_()  # as in a model: the rows' gradient travels back too
    times = {True: [], False: []}
    saved = []  # per round: off - on, the two measured back to back (a paired difference)
    for overlap in (True, False):  # a round not counted: the first steps of a process pay for its allocations
        train_step_times(layers[overlap], tokens, steps, warmup, group, x=x)
    for r in range(rounds):
        medians = {}
        for overlap in (True, False) if r % 2 == 0 else (False, True):  # neither always goes first
            medians[overlap] = median(train_step_times(layers[overlap], tokens, steps, warmup, group, x=x))
            times[overlap].append(medians[overlap])
        saved.append(medians[False] - medians[True])
        if rank == 0:
            print(f"round {r + 1} of {rounds}: overlap on {medians[True]:.1f} ms, off {medians[False]:.1f} ms",
                  flush=True)

    layer = layers[False]
    state_splits = _dispatch_splits(layer, x)  # this routing's exchange, timed alone
    rows = torch.randn(sum(state_splits[1]), cfg.hidden_dim).to(device, cfg.torch_dtype)
    out = rows.new_empty(sum(state_splits[0]), cfg.hidden_dim)
    a2a = timed_runs(lambda: dist.all_to_all_single(out, rows, state_splits[0], state_splits[1], group=group),
                     steps * rounds, warmup, device, group)
    shared = timed_runs(lambda: layer.shared(x).sum().backward(), steps * rounds, warmup, device, group)

    def pair(async_op: bool):  # the dispatch's exchange and the shared expert's forward, together or in turn
        work = dist.all_to_all_single(out, rows, state_splits[0], state_splits[1], group=group, async_op=async_op)
        with torch.no_grad():
            layer.shared(x)
        if async_op:
            work.wait()
    together = timed_runs(lambda: pair(True), steps * rounds, warmup, device, group)
    in_turn = timed_runs(lambda: pair(False), steps * rounds, warmup, device, group)
    return {"tokens": tokens, "world_size": N, "overlap_ms": median(times[True]), "no_overlap_ms": median(times[False]),
            "saved_ms": median(saved), "saved_ms_range": [min(saved), max(saved)],
            "dispatch_all_to_all_ms": median(a2a), "shared_fwd_bwd_ms": median(shared),
            "hideable_ms": min(2 * median(a2a), median(shared)),
            "pair_together_ms": median(together), "pair_in_turn_ms": median(in_turn),
            "overlap_round_ms": times[True], "no_overlap_round_ms": times[False]}


def _dispatch_splits(layer: MoELayer, x: torch.Tensor) -> tuple[list, list]:
    """(out_splits, in_splits) of the all-to-all dispatcher's row exchange for input x."""
    with torch.no_grad():
        _, _, state = layer.dispatch(x, layer.route(x))
    return state.out_splits, state.in_splits


def profile_step(layer: MoELayer, x: torch.Tensor, group=None, events_out: list | None = None) -> list[dict]:
    """One training step (forward, backward, AdamW) of a `label_phases`-labelled layer under torch.profiler ->
    this rank's bars {"lane", "name", "start_ms", "end_ms"}, ordered by start. Lanes: "compute" (this rank's
    threads: the layer's phases, backward included, and the optimizer), "communication" (gloo's threads) and, on
    a GPU, "stream N" (the kernels of CUDA stream N, named by the phase that launched them; NCCL's: "all-to-all").
    Times are ms from the end of a barrier inside the profile: the ranks leave it together, so their bars share
    one time axis. events_out: a list to receive the trace's raw events (`trace_bars` reads them)."""
    opt = make_adamw(layer.parameters())
    x = x.detach().requires_grad_()  # as in a model: the rows' gradient travels back too
    target = torch.zeros_like(x)

    def step():
        y, _ = layer(x)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(y, target).backward()
        with torch.profiler.record_function("optimizer"):
            opt.step()

    for _ in range(3):  # warm: the first steps allocate the optimizer's state and the gradients
        step()
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no profiler_start/stop lines on stderr
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(x.device)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("barrier"):
            dist.barrier(group=group)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
        step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    with tempfile.TemporaryDirectory() as tmp:  # the Chrome trace: the same fields in every recent torch
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    if events_out is not None:
        events_out.extend(events)
    return trace_bars(events)


def _span(e: dict) -> tuple[float, float]:
    return e["ts"], e["ts"] + e.get("dur", 0)


def _innermost(ranges: list[dict], t0: float, t1: float) -> dict | None:
    """The innermost of `ranges` that contains [t0, t1], or None (the shared expert runs inside the dispatch)."""
    around = [r for r in ranges if _span(r)[0] <= t0 <= t1 <= _span(r)[1]]
    return max(around, key=lambda r: r["ts"]) if around else None


def trace_bars(events: list[dict]) -> list[dict]:
    """A Chrome trace's complete events ("ph": "X") of one `profile_step` -> its bars (see there)."""
    main = next(e["tid"] for e in events if e["name"] == "optimizer")
    zero = next(_span(e)[1] for e in events if e["name"] == "barrier" and e["tid"] == main)
    ranges = [e for e in events if e["tid"] == main and e["name"] in PHASES + ("optimizer",)]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    phase_of_seq = {}  # a forward op's sequence number -> its phase, for the backward ops autograd makes of it
    for e in ops:
        seq = e.get("args", {}).get("Sequence number")
        if e["tid"] == main and seq is not None:
            r = _innermost(ranges, *_span(e))
            if r is not None:
                phase_of_seq.setdefault(seq, r["name"])
    backward = [e for e in ops if e["name"].startswith("autograd::engine::evaluate_function:")
                and e.get("args", {}).get("Sequence number") in phase_of_seq]
    bars = [("compute", r["name"], r) for r in ranges]
    bars += [("compute", phase_of_seq[e["args"]["Sequence number"]] + " (backward)", e) for e in backward]
    bars += [("communication", "all-to-all" if "all_to_all" in e["name"] else e["name"][5:], e)
             for e in events if e["name"].startswith("gloo:") and e["tid"] != main]
    bars += [("link", "link", e) for e in _link_exchanges(events)]

    op_of_id = {e["args"]["External id"]: e for e in ops if "External id" in e.get("args", {})}
    for k in events:
        if k.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        name = "all-to-all" if "nccl" in k["name"].lower() else "other"
        op = op_of_id.get(k.get("args", {}).get("External id"))  # the op that launched it
        if name == "other" and op is not None:
            t = op["ts"]
            r = _innermost(ranges, t, t) if op["tid"] == main else None
            b = _innermost([e for e in backward if e["tid"] == op["tid"]], t, t)
            if b is not None and (r is None or b["ts"] > r["ts"]):
                name = phase_of_seq[b["args"]["Sequence number"]] + " (backward)"
            elif r is not None:
                name = r["name"]
        bars.append((f"stream {k['args'].get('stream', '?')}", name, k))
    bars = [{"lane": lane, "name": name, "start_ms": (_span(e)[0] - zero) / 1e3, "end_ms": (_span(e)[1] - zero) / 1e3}
            for lane, name, e in bars if _span(e)[1] > zero]  # the barrier's own collective ends before 0
    return sorted(bars, key=lambda b: b["start_ms"])


def _link_exchanges(events: list[dict]) -> list[dict]:
    """An `EmulatedLink`'s exchanges as spans ("link N start Dus", "link N wait"): from the start until the link's
    D microseconds are up, or until the end of the wait if that began earlier and ended later (the real collective
    took longer than the link)."""
    marks = {}
    for e in events:
        words = e["name"].split()
        if len(words) >= 3 and words[0] == "link" and words[2] in ("start", "wait"):
            marks.setdefault(words[1], {})[words[2]] = e
    spans = []
    for m in marks.values():
        if "start" not in m or "wait" not in m:
            continue
        start, link_end = m["start"]["ts"], m["start"]["ts"] + float(m["start"]["name"].split()[3][:-2])
        wait_start, wait_end = _span(m["wait"])
        spans.append({"ts": start, "dur": (max(link_end, wait_end) if wait_start < link_end else link_end) - start})
    return spans


def timelines(cfg: MoEConfig, tokens: int, dispatcher: str = "alltoall", experts: str = "grouped", group=None,
              device=None, events_out: dict | None = None) -> dict[str, list[list[dict]]]:
    """{"overlap" | "no overlap": [bars of rank 0, bars of rank 1, ...]}: one profiled step each, every rank's
    bars gathered (every rank of `group` calls it together). events_out: a dict to receive this rank's raw
    profiler events of each setting."""
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(100 + rank)).to(device)
    out = {}
    for overlap, layer in _layers(cfg, dispatcher, experts, group, device).items():
        setting = "overlap" if overlap else "no overlap"
        raw = events_out.setdefault(setting, []) if events_out is not None else None
        bars = profile_step(label_phases(layer), x.to(cfg.torch_dtype), group, events_out=raw)
        everyone = [None] * N
        dist.all_gather_object(everyone, bars, group=group)
        out[setting] = everyone
    return out


def _work(bars: list[dict], phase: str) -> list[tuple]:
    """When `phase` ran: its kernels where the bars have GPU streams, else its ranges on the compute lane."""
    on_gpu = any(b["lane"].startswith("stream") for b in bars)
    return [(b["start_ms"], b["end_ms"]) for b in bars if b["name"].startswith(phase)
            and (b["lane"].startswith("stream") if on_gpu else b["lane"] == "compute")]


def _exchange_name(bars: list[dict]) -> str:
    return "link" if any(b["name"] == "link" for b in bars) else "all-to-all"


def hidden_ms(bars: list[dict], phase: str = "shared expert") -> float:
    """How long this rank's exchanges (on an emulated link where there is one; else gloo's thread or NCCL's
    kernels) ran while `phase` ran (forward and backward)."""
    comm = [(b["start_ms"], b["end_ms"]) for b in bars if b["name"] == _exchange_name(bars)]
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in comm for s2, e2 in _work(bars, phase))


def communication_ms(bars: list[dict]) -> float:
    """The total length of this rank's exchanges (on the emulated link where there is one)."""
    return sum(b["end_ms"] - b["start_ms"] for b in bars if b["name"] == _exchange_name(bars))


def streams_busy_ms(bars: list[dict]) -> float:
    """How long at least one of this rank's GPU streams ran a kernel (the union of the stream bars)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((b["start_ms"], b["end_ms"]) for b in bars if b["lane"].startswith("stream")):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def _lanes(bars: list[dict]) -> list[str]:
    streams = sorted({b["lane"] for b in bars if b["lane"].startswith("stream")}, key=lambda n: int(n.split()[1]))
    return [lane for lane in ("compute", "communication", "link") if any(b["lane"] == lane for b in bars)] + streams


def draw_timeline(traces: dict[str, list[list[dict]]], title: str = ""):
    """Both settings, every rank: its lanes (`profile_step`) on one time axis per setting, 0 where the ranks
    left the barrier. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = max(sum(len(_lanes(bars)) for bars in ranks) for ranks in traces.values())
    fig, axes = plt.subplots(len(traces), 1, figsize=(13, 1.1 + (0.5 * rows + 0.6) * len(traces)), squeeze=False,
                             sharex=True)  # one time axis: the settings' steps compare at a glance
    for ax, (setting, ranks) in zip(axes[:, 0], traces.items()):
        labels = []
        for r, bars in enumerate(ranks):
            for lane in _lanes(bars):
                y = -len(labels)
                labels.append((y, f"rank {r} {lane}"))
                for b in bars:
                    if b["lane"] != lane:
                        continue
                    base = b["name"].replace(" (backward)", "")
                    ax.barh(y, b["end_ms"] - b["start_ms"], left=b["start_ms"], height=0.7,
                            color=COLORS.get(base, "lightgrey"), alpha=0.45 if "backward" in b["name"] else 1.0,
                            edgecolor="none")
        ax.set_yticks([y for y, _ in labels], [name for _, name in labels], fontsize=8)
        ax.set_title(f"{setting}: shared expert's time with an exchange in flight on rank 0, "
                     f"{hidden_ms(ranks[0]):.1f} ms", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms after the ranks left a barrier (pale: backward)")
    handles = [Patch(color=c, label=n) for n, c in COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


CPU_SHAPE = dict(num_experts=8, top_k=2, hidden_dim=1024, ffn_dim=128, shared_ffn_dim=128, seed=0)
CPU_TOKENS = 1024
# one GPU: a bf16 layer big enough to keep the GPU busy, a shared expert twice an expert wide, the grouped bank
GPU_SHAPE = dict(num_experts=16, top_k=4, hidden_dim=2048, ffn_dim=1024, shared_ffn_dim=2048, activation="swiglu",
                 dtype="bfloat16", seed=0)
GPU_TOKENS = 8192


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="default: images/overlap_cpu.json, or _1xgpu on GPUs")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--events", default=None, help="also write rank 0's raw trace events here (JSON)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, N = rank_and_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    keep_freed_memory()
    shape, tokens = (GPU_SHAPE, GPU_TOKENS) if cuda else (CPU_SHAPE, CPU_TOKENS)
    tokens = a.tokens or tokens
    out = a.out or ("images/overlap_cpu.json" if not cuda else f"images/overlap_{N}xgpu.json")
    cfg = MoEConfig(**shape)
    record = record_header("lessons_lib.lab.overlap_timeline", device, argv)
    record |= {"config": shape, "tokens": tokens, "times": overlap_step_times(cfg, tokens, rounds=a.rounds,
                                                                              device=device)}
    events = {} if a.events else None
    record["timeline"] = timelines(cfg, tokens, device=device, events_out=events)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        draw_timeline(record["timeline"], f"{N} {dist.get_backend()} rank(s), {record['device']}").savefig(
            out.replace(".json", ".png"), dpi=110)
        if events is not None:
            with open(a.events, "w") as f:
                json.dump(events, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
