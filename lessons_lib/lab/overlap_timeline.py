"""Does the shared expert hide the dispatch? Step times with and without overlap, and a timeline of both ranks
drawn from torch.profiler (lesson 08).

`overlap_step_times` times the same layer, from the same weights and inputs, with `overlap` on and off, the two
interleaved round by round (so a machine that slows down mid-run slows both), next to what bounds the gain,
measured in the same run: the dispatch's all-to-all alone and the shared expert alone.

`profile_step` records one training step with torch.profiler and turns it into bars: the layer's phases on
the rank's own thread (`label_phases` names them with `record_function`; a backward op is given its forward
op's phase through the profiler's sequence numbers) and gloo's collectives on gloo's worker threads.
`draw_timeline` puts both ranks' bars on one time axis.

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.overlap_timeline --out images/overlap_cpu.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os

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
          "combine": "tab:red", "all-to-all": "black", "optimizer": "tab:gray"}


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


def profile_step(layer: MoELayer, x: torch.Tensor, group=None) -> list[dict]:
    """One training step (forward, backward, AdamW) of a `label_phases`-labelled layer under torch.profiler ->
    this rank's bars: {"lane": "compute" | "communication", "name", "start_ms", "end_ms"}, on the profiler's
    clock (the same clock in every process of one machine), ordered by start."""
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
    dist.barrier(group=group)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return _bars(prof.events())


def _bars(events) -> list[dict]:
    main = next(e.thread for e in events if e.name == "optimizer")
    ranges = [e for e in events if e.thread == main and e.name in PHASES + ("optimizer",)]
    phase_of_seq = {}  # a forward op's sequence number -> its phase, for the backward ops autograd makes of it
    for e in events:
        if e.thread == main and e.sequence_nr >= 0 and e.name not in PHASES:
            around = [r for r in ranges if r.time_range.start <= e.time_range.start <= e.time_range.end
                      <= r.time_range.end]
            if around:  # the innermost: the shared expert runs inside the dispatch
                phase_of_seq.setdefault(e.sequence_nr, max(around, key=lambda r: r.time_range.start).name)
    bars = [(("compute", r.name), r.time_range) for r in ranges]
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in phase_of_seq:
            bars.append((("compute", phase_of_seq[e.sequence_nr] + " (backward)"), e.time_range))
        elif e.name.startswith("gloo:") and e.thread != main:
            bars.append((("communication", "all-to-all" if "all_to_all" in e.name else e.name[5:]), e.time_range))
    bars = [{"lane": lane, "name": name, "start_ms": t.start / 1e3, "end_ms": t.end / 1e3}
            for (lane, name), t in bars]
    return sorted(bars, key=lambda b: b["start_ms"])


def timelines(cfg: MoEConfig, tokens: int, dispatcher: str = "alltoall", experts: str = "grouped", group=None,
              device=None) -> dict[str, list[list[dict]]]:
    """{"overlap" | "no overlap": [bars of rank 0, bars of rank 1, ...]}: one profiled step each, every rank's
    bars gathered (every rank of `group` calls it together)."""
    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(100 + rank)).to(device)
    out = {}
    for overlap, layer in _layers(cfg, dispatcher, experts, group, device).items():
        bars = profile_step(label_phases(layer), x.to(cfg.torch_dtype), group)
        everyone = [None] * N
        dist.all_gather_object(everyone, bars, group=group)
        out["overlap" if overlap else "no overlap"] = everyone
    return out


def hidden_ms(bars: list[dict], phase: str = "shared expert") -> float:
    """How long this rank's communication lane ran while its compute lane ran `phase` (forward and backward)."""
    comm = [(b["start_ms"], b["end_ms"]) for b in bars if b["lane"] == "communication"]
    comp = [(b["start_ms"], b["end_ms"]) for b in bars if b["lane"] == "compute" and b["name"].startswith(phase)]
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in comm for s2, e2 in comp)


def communication_ms(bars: list[dict]) -> float:
    """The total length of this rank's communication bars."""
    return sum(b["end_ms"] - b["start_ms"] for b in bars if b["lane"] == "communication")


def draw_timeline(traces: dict[str, list[list[dict]]], title: str = ""):
    """Both settings, every rank: a compute lane and a communication lane on one time axis per setting
    (0 = the first bar of the step on any rank). Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(traces), 1, figsize=(13, 1.1 + 1.2 * len(next(iter(traces.values())))
                                                        * len(traces)), squeeze=False)
    for ax, (setting, ranks) in zip(axes[:, 0], traces.items()):
        t0 = min(b["start_ms"] for bars in ranks for b in bars)
        labels = []
        for r, bars in enumerate(ranks):
            for lane_i, lane in enumerate(("compute", "communication")):
                y = -(2 * r + lane_i)
                labels.append((y, f"rank {r} {lane}"))
                for b in bars:
                    if b["lane"] != lane:
                        continue
                    base = b["name"].replace(" (backward)", "")
                    ax.barh(y, b["end_ms"] - b["start_ms"], left=b["start_ms"] - t0, height=0.7,
                            color=COLORS.get(base, "lightgrey"), alpha=0.45 if "backward" in b["name"] else 1.0,
                            edgecolor="none")
        ax.set_yticks([y for y, _ in labels], [name for _, name in labels], fontsize=8)
        ax.set_title(f"{setting}: shared expert's time with the all-to-all in flight on rank 0, "
                     f"{hidden_ms(ranks[0]):.1f} ms", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms from the start of the step (pale: backward)")
    handles = [Patch(color=c, label=n) for n, c in COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


CPU_SHAPE = dict(num_experts=8, top_k=2, hidden_dim=1024, ffn_dim=128, shared_ffn_dim=128, seed=0)
CPU_TOKENS = 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="images/overlap_cpu.json")
    p.add_argument("--tokens", type=int, default=CPU_TOKENS)
    p.add_argument("--rounds", type=int, default=12)
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    keep_freed_memory()
    cfg = MoEConfig(**CPU_SHAPE)
    record = record_header("lessons_lib.lab.overlap_timeline", torch.device("cpu"), argv)
    record |= {"config": CPU_SHAPE, "times": overlap_step_times(cfg, a.tokens, rounds=a.rounds),
               "timeline": timelines(cfg, a.tokens)}
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)
        draw_timeline(record["timeline"], f"{record['world_size']} gloo ranks, CPU").savefig(
            a.out.replace(".json", ".png"), dpi=110)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
