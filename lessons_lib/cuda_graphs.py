"""One CUDA graph per training step: what lesson 05's static shapes buy on a GPU.

At the course's small shape a GPU training step does almost no arithmetic. It is bound by the host,
which launches about 200 kernels per step (forward, backward, AdamW) and waits for the all-to-all's
split sizes. A CUDA graph records every kernel of one step once and replays them all with one launch.
Recording has two rules: nothing may wait for the GPU (no .item(), .tolist(), no size read back),
and every shape and address is fixed when it is recorded.

Lesson 05's padded capacity obeys both: every rank sends exactly C rows to every expert, so every split
size is known in advance (`AllToAllDispatcher._static_sizes`). With C = T (capacity factor E/k) nothing
is ever dropped, since T tokens offer an expert at most T pairs (a token picks k different experts). The
static layer then computes what the dropless one does, at the price of computing and sending the
empty slots:

    layer = MoELayer(static_dropless(cfg), "alltoall", "grouped", group).cuda()
    step = GraphedTrainStep(layer, x, target)   # warm up, record
    loss = step()                               # one replay: forward, backward, AdamW
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .capacity import expert_capacity
from .config import MoEConfig
from .dispatch_alltoall import AllToAllDispatcher


def static_dropless(cfg: MoEConfig) -> MoEConfig:
    """`cfg` with static shapes that drop nothing: every expert padded to C = T rows per rank."""
    return replace(cfg, capacity_factor=cfg.num_experts / cfg.top_k, pad_to_capacity=True)


class GraphedTrainStep:
    """A training step of `layer` (forward, MSE loss to `target` + aux_weight · aux loss, backward, AdamW),
    recorded once into a CUDA graph and replayed by each call.

    x, target: copied into the graph's own input buffers; a call may pass new values of the same shape.
    Every rank of an expert-parallel layer builds its step together with the same number of tokens.
    The warm-up steps (run eagerly first, as recording requires) are undone after recording: the first
    replay starts from the layer's weights as they were given, with fresh AdamW moments.
    """

    def __init__(self, layer, x: torch.Tensor, target: torch.Tensor, lr: float = 1e-3, aux_weight: float = 0.01,
                 warmup: int = 3):
        device = layer.router.weight.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the layer on a CUDA device; it is on {device}")
        if not isinstance(layer.dispatcher, AllToAllDispatcher) or not layer.cfg.pad_to_capacity:
            raise ValueError("a graphed step needs the 'alltoall' dispatcher with static shapes: "
                             "MoELayer(static_dropless(cfg), 'alltoall', ...)")
        _check_same_tokens(x.shape[0], layer.dispatcher.group, device)
        self.layer, self.aux_weight = layer, aux_weight
        self.x, self.target = x.detach().clone(), target.detach().clone()
        params = list(layer.parameters())
        # capturable: the optimizer keeps its step count on the GPU, so the update can be recorded too
        self.opt = torch.optim.AdamW(params, lr=lr, fused=True, capturable=True)
        start = [p.detach().clone() for p in params]

        # Warm-up on a side stream, as PyTorch's CUDA graph notes ask: lazy initialisation (cuBLAS handles, the
        # NCCL communicator, the optimizer's state) happens here, outside the recording.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)

        # Gradients start as None, so the recorded backward allocates them from the graph's own memory and
        # each replay overwrites them: no zero_grad inside the graph.
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        self._restart_from(params, start)

    def _step(self) -> torch.Tensor:
        y, aux = self.layer(self.x)
        loss = F.mse_loss(y, self.target) + self.aux_weight * aux.aux_loss
        loss.backward()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def _restart_from(self, params, start) -> None:
        # in place: the graph holds these addresses
        for p, s in zip(params, start):
            p.copy_(s)
        for state in self.opt.state.values():
            for v in state.values():
                v.zero_()  # step, exp_avg, exp_avg_sq

    def __call__(self, x: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """One training step; returns its loss (a GPU tensor: reading it waits for the step)."""
        if x is not None:
            self.x.copy_(x)
        if target is not None:
            self.target.copy_(target)
        self.graph.replay()
        return self.loss


def _check_same_tokens(tokens: int, group, device) -> None:
    """Every rank records split sizes from its own C, so every rank must have the same T (hence the same C)."""
    if not dist.is_initialized():
        return
    n = torch.tensor([tokens], device=device)
    every = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, n, group=group)
    counts = [int(t) for t in every]
    if len(set(counts)) > 1:
        raise ValueError(f"a graphed step needs the same token count on every rank (static shapes); got {counts}")


def eager_train_step(layer, x: torch.Tensor, target: torch.Tensor, lr: float = 1e-3, aux_weight: float = 0.01):
    """The same step as `GraphedTrainStep`, run eagerly (for checking a graph against it, and for timing)."""
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, fused=True)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        y, aux = layer(x)
        loss = F.mse_loss(y, target) + aux_weight * aux.aux_loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def padding_fraction(cfg: MoEConfig, tokens: int) -> float:
    """Of the rows a static layer sends and computes, the fraction that are empty slots: 1 − k·T / (E·C)."""
    C = expert_capacity(cfg, tokens)
    return 1 - cfg.top_k * tokens / (cfg.num_experts * C)


def compare_graph_with_eager(cfg: MoEConfig, tokens: int, device, steps: int = 3, experts: str = "grouped",
                             group=None, seed: int = 0) -> dict:
    """Run `steps` training steps of the static layer eagerly and as graph replays, from the same weights on the
    same tokens; return the largest relative difference of the weights after them, and of the losses."""
    from .equivalence import relative_error
    from .layer import MoELayer

    cfg = static_dropless(cfg) if not cfg.pad_to_capacity else cfg
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    target = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    eager = MoELayer(cfg, "alltoall", experts, group).to(device)
    graphed = MoELayer(cfg, "alltoall", experts, group).to(device)
    graphed.load_state_dict(eager.state_dict())
    eager_step, graph_step = eager_train_step(eager, x, target), GraphedTrainStep(graphed, x, target)
    loss_errors = [relative_error(graph_step().clone(), eager_step()) for _ in range(steps)]
    weight_errors = {n: relative_error(p, dict(eager.named_parameters())[n]) for n, p in graphed.named_parameters()}
    return {"loss": max(loss_errors), "weights": max(weight_errors.values()), "per_weight": weight_errors}


def step_times(cfg: MoEConfig, tokens: int, device, steps: int = 50, warmup: int = 10, experts: str = "grouped",
               group=None) -> dict:
    """Median ms per training step (slowest rank) of the final layer ('alltoall' + `experts`) three ways:
    dropless and eager (lesson 03's layer), static and eager, static and replayed from a CUDA graph."""
    from .layer import MoELayer
    from .timing import median, timed_runs, train_step_times

    dropless = MoELayer(cfg, "alltoall", experts, group).to(device)
    out = {"dropless_eager_ms": median(train_step_times(dropless, tokens, steps, warmup, group))}
    del dropless
    static = static_dropless(cfg)
    layer = MoELayer(static, "alltoall", experts, group).to(device)
    out["static_eager_ms"] = median(train_step_times(layer, tokens, steps, warmup, group))
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x, target = (torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype) for _ in range(2))
    out["graph_ms"] = median(timed_runs(GraphedTrainStep(layer, x, target), steps, warmup, device, group))
    out["capacity"] = expert_capacity(static, tokens)
    out["padding_fraction"] = padding_fraction(static, tokens)
    return out


def plot_step_times(record: dict, path) -> None:
    """Training step time of each bank three ways (dropless eager, static eager, static graph), from a record
    with `banks` (images/cuda_graph_*.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banks = list(record["banks"])
    ways = (("dropless_eager_ms", "dropless, eager (lesson 03)"), ("static_eager_ms", "static shapes, eager"),
            ("graph_ms", "static shapes, one CUDA graph"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (key, label) in enumerate(ways):
        vals = [record["banks"][b][key] for b in banks]
        bars = ax.bar([j + (i - 1) * 0.27 for j in range(len(banks))], vals, 0.27, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(banks)), [f"alltoall + {b}" for b in banks])
    ax.set(ylabel="ms per training step (median)",
           title=f"{record['device']} × {record['world_size']}, {record['tokens_per_rank']} tokens per rank, "
                 f"{record['config']['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """torchrun --nproc-per-node N -m lessons_lib.cuda_graphs [--tokens 32] [--out FILE.json]: the bench's small
    shape, timed three ways (`step_times`), and a graph checked against eager steps (`compare_graph_with_eager`)."""
    import argparse
    import datetime
    import json
    import sys

    from .bench import SHAPES
    from .distributed import init_from_torchrun, leave_torchrun

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    ap.add_argument("--experts", default="grouped")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", help="write the JSON record here")
    args = ap.parse_args(argv)
    device = init_from_torchrun()
    cfg = SHAPES["small"][0]
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world_size": dist.get_world_size(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "config": vars(cfg).copy(), "tokens_per_rank": args.tokens,
              "experts": args.experts,
              "command": f"torchrun --nproc-per-node {dist.get_world_size()} -m lessons_lib.cuda_graphs "
                         + " ".join(sys.argv[1:] if argv is None else argv)}
    check = compare_graph_with_eager(cfg, args.tokens, device, experts=args.experts)
    record["graph_vs_eager_max_rel_error"] = {"loss": check["loss"], "weights": check["weights"]}
    record.update(step_times(cfg, args.tokens, device, args.steps, args.warmup, args.experts))
    if dist.get_rank() == 0:
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
    leave_torchrun()


if __name__ == "__main__":
    main()
