"""What reading the all-to-all's split sizes without blocking saves (lesson 03).

The all-to-all dispatcher needs its split sizes on the host. A blocking `tolist()` leaves the GPU idle from the
moment the sizes are ready until the host has queued new work; `dispatch_alltoall.read_later` copies them without
blocking and queues the rows' gather before it waits. `readback_times` times forward + backward of the same layer
both ways (`AllToAllDispatcher.read_sizes_later`), alternating the two in rounds so that both see the same
machine, with the `local` dispatcher (no sizes to read) as the reference. On a GPU:

    torchrun --standalone --nproc-per-node 1 -m lessons_lib.lab.sizes_readback --out images/sizes_readback_1xh200.json
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.distributed import rank_and_size
from ..moe.layer import MoELayer
from .records import record_arguments, record_header, write_record
from .shapes import REALISTIC
from .timing import median, timed_runs

WAYS = ("local", "alltoall, read_later", "alltoall, blocking tolist")


def readback_times(cfg: MoEConfig, tokens: int, device, rounds: int = 4, steps: int = 15, warmup: int = 3,
                   group=None) -> dict:
    """{way: [median ms of forward + backward (input gradient included) in each round]} for the `WAYS` (without
    `local` on several ranks), each way timed `steps` times after `warmup` in every round. Under torchrun: every
    rank of `group` calls it together."""
    _, N = rank_and_size(group)
    ways = WAYS if N == 1 else WAYS[1:]  # the local dispatcher holds every expert: one rank only
    dispatchers = ["alltoall"] if N > 1 else ["local", "alltoall"]
    layers = {d: MoELayer(cfg, d, "grouped", group).to(device) for d in dispatchers}
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype).requires_grad_()
    grad_y = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way in times:
            layer = layers["local" if way == "local" else "alltoall"]
            layers["alltoall"].dispatcher.read_sizes_later = way != "alltoall, blocking tolist"

            def fwd_bwd():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x)[0].backward(grad_y)

            times[way].append(median(timed_runs(fwd_bwd, steps, warmup, device, group)))
    layers["alltoall"].dispatcher.read_sizes_later = True
    return times


def main(argv=None) -> None:
    from .torchrun import init_from_torchrun, leave_torchrun

    a = record_arguments(__doc__.splitlines()[0], "images/sizes_readback_1xh200.json", argv)
    if a.plot:
        raise SystemExit("this record has no figure: its JSON and the README's table are all")
    device = init_from_torchrun("lessons_lib.lab.sizes_readback")
    # on CPU ranks, a small shape: there the sizes are read at once either way (`read_later`)
    cfg = REALISTIC if device.type == "cuda" else MoEConfig(num_experts=8, top_k=2, hidden_dim=64, ffn_dim=64)
    sizes = (4096, 8192) if device.type == "cuda" else (64,)
    record = record_header("lessons_lib.lab.sizes_readback", device, argv)
    record["runs"] = {}
    for tokens in sizes:
        times = readback_times(cfg, tokens, device)
        record["runs"][str(tokens)] = {"rounds_ms": times, "median_ms": {w: median(t) for w, t in times.items()}}
        if dist.get_rank() == 0:
            print(tokens, {w: round(median(t), 2) for w, t in times.items()}, flush=True)
    if dist.get_rank() == 0:
        write_record(record, a.out)
    leave_torchrun()


if __name__ == "__main__":
    main()
