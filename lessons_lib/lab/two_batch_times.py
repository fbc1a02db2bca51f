"""Two micro-batches against the layer whole, measured and modelled (lesson 09).

Two micro-batches (`moe.two_batch`) hide one half's exchange behind the other half's experts:

    dispatch a, then dispatch b ‖ experts a, then combine a ‖ experts b, then combine b

(‖: runs while the exchange on its left is in flight). `two_batch_schedule_ms` is that schedule from the phases of
a half. A half does half the experts' work and sends half the rows, but every call of a phase also costs something
whatever its size (the count exchange, the host's read of the split sizes, launches, an exchange's latency), and
two halves pay it twice: `two_batch_model_ms` writes a half's phases from the whole layer's and that fixed cost
(exercise 09.2). `two_batch_times` measures the layer whole and in two halves, next to the schedule fed with the
phases of a half timed alone, which carry their fixed costs with them.
"""
from __future__ import annotations

import contextlib

import torch

from ..moe.config import MoEConfig
from ..moe.init import init_full_state_dict
from ..moe.layer import MoELayer
from ..moe.two_batch import two_batch_forward
from .emulated_link import EmulatedLink
from .equivalence import relative_error
from .timing import median, own_core, rank_tokens, timed_runs

PHASES = ("route_ms", "dispatch_ms", "experts_ms", "combine_ms")


def two_batch_schedule_ms(dispatch_ms: float, experts_ms: float, combine_ms: float) -> float:
    """Two halves, each phase of a half taking the given time, each exchange fully beside the other half's
    experts: dispatch a; dispatch b beside experts a; combine a beside experts b; combine b."""
    return dispatch_ms + max(dispatch_ms, experts_ms) + max(combine_ms, experts_ms) + combine_ms


def two_batch_model_ms(dispatch_ms: float, experts_ms: float, combine_ms: float, fixed_ms: float = 0.0) -> float:
    """The two-micro-batch schedule from the whole layer's phases: a half's experts take half the whole's, and a
    half's exchange half of what depends on the rows plus the whole fixed cost `fixed_ms` (what an exchange of
    almost nothing takes), which each half pays again. Unsplit, the layer takes dispatch + experts + combine."""
    def half(phase_ms: float) -> float:
        return fixed_ms + (phase_ms - fixed_ms) / 2
    return two_batch_schedule_ms(half(dispatch_ms), experts_ms / 2, half(combine_ms))


def _phases_ms(layer: MoELayer, x: torch.Tensor, steps: int, warmup: int, device, group) -> dict:
    """The layer's route, dispatch, experts and combine on x, each timed alone (no autograd)."""
    routing = layer.route(x)
    rows, counts, state = layer.dispatch(x, routing)
    out = layer.run_experts(rows, counts, state)
    t = {"route_ms": lambda: layer.route(x), "dispatch_ms": lambda: layer.dispatch(x, routing),
         "experts_ms": lambda: layer.run_experts(rows, counts, state), "combine_ms": lambda: layer.combine(out, state)}
    return {name: median(timed_runs(fn, steps, warmup, device, group)) for name, fn in t.items()}


def two_batch_times(cfg: MoEConfig, tokens: list[int], link: EmulatedLink | None = None, steps: int = 15,
                    warmup: int = 3, group=None, device=None) -> list[dict]:
    """For each number of tokens per rank: the layer whole and as two micro-batches (with and without overlap),
    medians of `steps` (no autograd, as at inference), the largest difference between the two outputs, and the
    model of each way from the phases timed alone: the whole's phases one after the other ("model_whole_ms"), and
    the schedule fed with the phases of a half (route twice, then `two_batch_schedule_ms`: "model_two_batch_ms").
    Both leave out the same thing, what runs between the phases, so they compare with each other. "fixed_ms" is
    what each phase costs whatever its size, 2·half − whole. On `link` where given; every rank of `group` calls it
    together."""
    if cfg.shared_ffn_dim is not None:  # it would run beside the first half's dispatch only: not in the model
        raise ValueError("two_batch_times times the routed layer: MoEConfig(shared_ffn_dim=None)")
    if not tokens or min(tokens) < 2:
        raise ValueError(f"two micro-batches need at least 2 tokens per rank, got {tokens}")
    device = torch.device("cpu") if device is None else device
    layer = MoELayer(cfg, "alltoall", "grouped", group=group).to(device)
    layer.load_full_state_dict(init_full_state_dict(cfg))
    rows = []
    with (link if link is not None else contextlib.nullcontext()), own_core(), torch.no_grad():
        for T in tokens:
            x = rank_tokens(cfg.hidden_dim, T, device, cfg.torch_dtype)
            whole = layer(x)[0]
            diff = relative_error(two_batch_forward(layer, x), whole)
            phases = _phases_ms(layer, x, steps, warmup, device, group)
            half = _phases_ms(layer, x[:(T + 1) // 2], steps, warmup, device, group)  # two_batch_forward's first half
            ways = {"whole_ms": lambda: layer(x), "two_batch_ms": lambda: two_batch_forward(layer, x),
                    "two_batch_no_overlap_ms": lambda: two_batch_forward(layer, x, overlap=False)}
            times = {name: median(timed_runs(fn, steps, warmup, device, group)) for name, fn in ways.items()}
            model = 2 * half["route_ms"] + two_batch_schedule_ms(half["dispatch_ms"], half["experts_ms"],
                                                                 half["combine_ms"])
            rows.append({"tokens": T, **times, "phases": phases, "half_phases": half,
                         "fixed_ms": {name: 2 * half[name] - phases[name] for name in PHASES},
                         "model_whole_ms": sum(phases.values()), "model_two_batch_ms": model,
                         "max_relative_difference": diff})
    return rows


def plot_two_batch(ax, rows: list[dict]) -> None:
    """The layer whole and in two micro-batches, measured and modelled (`two_batch_times`' rows), on `ax`."""
    T = [r["tokens"] for r in rows]
    ax.plot(T, [r["whole_ms"] for r in rows], "o-", label="whole")
    ax.plot(T, [r["two_batch_ms"] for r in rows], "s-", label="two micro-batches")
    if "model_two_batch_ms" in rows[0]:
        whole = [r.get("model_whole_ms", sum(r["phases"].values())) for r in rows]
        ax.plot(T, whole, ":", color="tab:blue", label="whole, model: its phases one after the other")
        ax.plot(T, [r["model_two_batch_ms"] for r in rows], ":", color="tab:orange",
                label="two micro-batches, model: the schedule of the half-size phases")
    ax.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="ms per layer (no autograd)",
           title="two micro-batches: a loss where fixed costs rule,\na gain where transfers do")
    ax.legend(fontsize=8)
