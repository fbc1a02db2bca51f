"""What hiding communication saves, measured against its model (lesson 09).

Work that does not need an exchange's rows can run while they travel. What that saves is at most the shorter of
the two, the work and the exchange:

    saving = min(work, exchange)      for each exchange with work beside it

The layer has two such pairs in a training step: the shared expert's forward beside the dispatch, and its
backward beside the dispatch's gradient on its way back. `overlap_saving` measures the saving of forward +
backward with `overlap` on and off, next to the model computed from the same run's parts: the shared expert's
forward and backward timed alone, and the dispatch's exchange timed alone. On CPU ranks the exchange runs on an
`EmulatedLink` (a link of chosen speed, whose wait uses no core); between GPUs on the real one (NCCL).

The lesson's record also holds two micro-batches on the same link (`two_batch_times`, the next idea).

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.overlap_saving --out images/overlap_link_cpu.json
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.init import init_full_state_dict
from ..moe.layer import MoELayer
from .emulated_link import EmulatedLink
from .records import record_arguments, record_header, redraw_record, write_record
from .timing import keep_freed_memory, median, own_core, rank_tokens, timed_runs
from .two_batch_times import plot_two_batch, two_batch_times


def _dispatch_exchange(layer: MoELayer, x: torch.Tensor):
    """A function running the dispatch's row exchange of input x alone, as the layer would (same split sizes)."""
    with torch.no_grad():
        _, _, state = layer.dispatch(x, layer.route(x))
    out_splits, in_splits = state.out_splits, state.in_splits
    rows = x.new_empty(sum(in_splits), x.shape[1]).normal_()
    out = x.new_empty(sum(out_splits), x.shape[1])
    return lambda: dist.all_to_all_single(out, rows, out_splits, in_splits, group=layer.dispatcher.group)


def overlap_saving(cfg: MoEConfig, tokens: int, link: EmulatedLink | None = None, rounds: int = 5, pairs: int = 30,
                   warmup: int = 3, group=None, device=None, progress: bool = False) -> dict:
    """Forward + backward of one layer with its shared expert run beside the dispatch (overlap on) and after it
    (off), the two alternating step by step; a round's saving is the median over its `pairs` of (off - on),
    each step the slowest rank's time. In the same run, for the model: the shared expert's forward and backward
    timed alone and the dispatch's row exchange timed alone (on `link` where given). Every rank of `group` calls
    it together; with `progress`, rank 0 prints a line per round."""
    if cfg.shared_ffn_dim is None:
        raise ValueError("overlap_saving needs a shared expert to hide: MoEConfig(shared_ffn_dim=...)")
    if rounds < 1 or pairs < 1:
        raise ValueError(f"overlap_saving needs rounds and pairs >= 1, got {rounds}, {pairs}")
    rank, N = rank_and_size(group)
    device = torch.device("cpu") if device is None else device
    layer = MoELayer(cfg, "alltoall", "grouped", group=group).to(device)
    layer.load_full_state_dict(init_full_state_dict(cfg))
    x = rank_tokens(cfg.hidden_dim, tokens, device, cfg.torch_dtype)
    x.requires_grad_()  # as in a model: the rows' gradient travels back too

    def step(overlap: bool):  # the gradients accumulate from step to step: harmless for timing, nothing trains
        layer.overlap = overlap  # one layer, so both ways use the same tensors and caches
        y, _ = layer(x)
        y.float().sum().backward()

    def one(overlap: bool) -> float:
        return timed_runs(lambda: step(overlap), 1, 0, device, group)[0]

    with (link if link is not None else contextlib.nullcontext()), own_core():
        for overlap in (True, False, True, False):  # warm: the first steps allocate
            timed_runs(lambda: step(overlap), 1, warmup, device, group)
        saved, on, off = [], [], []
        for r in range(rounds):
            diffs = []
            for i in range(pairs):  # alternate, so that a machine slowing down slows both ways alike
                if i % 2 == 0:
                    t_on, t_off = one(True), one(False)
                else:
                    t_off, t_on = one(False), one(True)
                diffs.append(t_off - t_on)
                on.append(t_on)
                off.append(t_off)
            saved.append(median(diffs))
            if progress and rank == 0:
                print(f"round {r + 1} of {rounds}: overlap saved {saved[-1]:.2f} ms a step", flush=True)
        # a rank alone sends nothing (AllToAllDispatcher._exchange): there is no exchange to hide
        exchange = median(timed_runs(_dispatch_exchange(layer, x.detach()), 2 * pairs, warmup, device, group)) \
            if N > 1 else 0.0
        shared = layer.shared
        fwd = median(timed_runs(lambda: shared(x), 2 * pairs, warmup, device, group))
        fwd_bwd = median(timed_runs(lambda: shared(x).float().sum().backward(), 2 * pairs, warmup, device, group))
    bwd = max(fwd_bwd - fwd, 0.0)
    model = min(fwd, exchange) + min(bwd, exchange)
    saved_ms = median(saved)
    return {"tokens": tokens, "world_size": N, "link": None if link is None else repr(link),
            "rounds": rounds, "pairs": pairs, "saved_ms_rounds": saved, "saved_ms": saved_ms,
            "spread": max(abs(s / saved_ms - 1) for s in saved) if saved_ms else float("inf"),
            "overlap_ms": median(on), "no_overlap_ms": median(off),
            "shared_forward_ms": fwd, "shared_backward_ms": bwd, "exchange_ms": exchange, "model_ms": model}


# the lesson's setting: wide rows and a shared expert four times an expert's width, on a link of known speed
CPU_SHAPE = dict(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=32, shared_ffn_dim=1024, seed=0)
CPU_TOKENS = 512
CPU_LINK = dict(gb_per_s=0.05, latency_us=200.0)
# two micro-batches: no shared expert, experts with work comparable to the exchange at the largest size
CPU_TWO_BATCH_SHAPE = dict(num_experts=8, top_k=2, hidden_dim=256, ffn_dim=512, seed=0)
CPU_TWO_BATCH_TOKENS = (16, 256, 2048)


def plot_saving(ax, saving: dict) -> None:
    """Each round's saving against the model (`overlap_saving`'s result), on `ax`."""
    rounds = saving["saved_ms_rounds"]
    ax.plot(range(1, len(rounds) + 1), rounds, "o", label="saved, each round (median of its pairs)")
    ax.axhline(saving["model_ms"], color="k", ls="--", label="model: min(fwd, exchange) + min(bwd, exchange)")
    ax.axhspan(0.9 * saving["saved_ms"], 1.1 * saving["saved_ms"], color="tab:blue", alpha=0.1,
               label="the rounds' median ± 10%")
    top = 1.4 * max(max(rounds), saving["model_ms"])
    ax.set(xlabel="round", ylabel="ms saved per forward + backward", ylim=(0, top), xticks=range(1, len(rounds) + 1),
           title=f"the shared expert beside the dispatch\non {saving['link'] or 'the real link'}")
    ax.legend(fontsize=8, loc="lower right")


def plot_record(record: dict):
    """Left: the saving of each round against the model. Right: whole against two micro-batches."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    plot_saving(left, record["saving"])
    if record.get("two_batch"):
        plot_two_batch(right, record["two_batch"])
    fig.suptitle(f"{record['device']}, {record.get('world_size', 1)} ranks, torch {record['torch']}, "
                 f"{record['date']}", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    import argparse

    from .torchrun import init_from_torchrun, leave_torchrun

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=80)
    own, rest = p.parse_known_args(argv)
    a = record_arguments(__doc__.splitlines()[0], "images/overlap_link_cpu.json", rest)
    if a.plot:
        return redraw_record(a.out, plot_record)
    device = init_from_torchrun("lessons_lib.lab.overlap_saving")
    keep_freed_memory()
    cfg = MoEConfig(**CPU_SHAPE)
    link = EmulatedLink(**CPU_LINK) if device.type == "cpu" else None  # between GPUs: the real link
    record = record_header("lessons_lib.lab.overlap_saving", device, argv)
    record |= {"config": CPU_SHAPE, "link": CPU_LINK if link else None,
               "saving": overlap_saving(cfg, CPU_TOKENS, link, own.rounds, own.pairs, device=device,
                                        progress=dist.get_rank() == 0),
               "two_batch_config": CPU_TWO_BATCH_SHAPE,
               "two_batch": two_batch_times(MoEConfig(**CPU_TWO_BATCH_SHAPE), list(CPU_TWO_BATCH_TOKENS), link,
                                              device=device)}
    if dist.get_rank() == 0:
        write_record(record, a.out, plot_record)
    leave_torchrun()


if __name__ == "__main__":
    main()
