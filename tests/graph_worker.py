"""Runs on every rank under torchrun (tests/test_cuda_graphs.py launches it with launcher.run_script).

Modes (params["mode"]):
  capture_path: the all-to-all dispatcher as it runs inside a CUDA graph (split sizes known in advance, no
      count exchange, no host read), forced on here by pretending to be recording, so gloo ranks on a CPU
      check it: equal to the single-device layer, and no .item()/.tolist()/int() of a tensor anywhere;
  graph: (GPU, nccl) training steps replayed from a CUDA graph against the same steps run eagerly.
"""
import torch
import torch.distributed as dist

from launcher import runtime
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.equivalence import compare_with_single_device
from lessons_lib.lab.graph_times import compare_graph_with_eager
from lessons_lib.moe import dispatch_alltoall
from lessons_lib.moe.capacity import static_dropless


class HostRead(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise HostRead("a host read of a tensor, which a CUDA graph cannot record")


class NoHostReads:
    """Inside: any read of a tensor's value by Python raises, as it would while recording a CUDA graph."""

    NAMES = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.Tensor, n, _refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def capture_path(rank, N, device):
    base = dict(num_experts=4 * N, top_k=2, hidden_dim=16, ffn_dim=32)
    out = {}
    # Eager first: its traffic record must survive the "recorded" passes below.
    layer = MoELayer(static_dropless(MoEConfig(**base)), "alltoall", "grouped").to(device)
    layer(torch.randn(8, 16, device=device))
    eager_traffic = {p: v.sent for p, v in layer.dispatcher.traffic.phases.items()}
    dispatch_alltoall.capturing = lambda: True
    try:
        rows = []
        for activation in ("gelu", "swiglu"):
            cfg = static_dropless(MoEConfig(**base, activation=activation))
            for bank in ("loop", "bmm", "grouped"):
                for routing in ("random", "one_expert", "own_experts") + (("receives_nothing",) if N > 1 else ()):
                    errors = compare_with_single_device(cfg, "alltoall", bank, tokens_per_rank=[8] * N,
                                                        routing=routing, device=device)
                    rows.append({"case": f"{activation}, {bank}, {routing}", "errors": errors})
        out["equality"] = rows
        x = torch.randn(8, 16, device=device, requires_grad=True)
        try:
            with NoHostReads():
                y, aux = layer(x)
                (y.square().sum() + aux.aux_loss).backward()
            out["host_reads"] = "none"
        except HostRead as e:
            out["host_reads"] = str(e)
        out["traffic_kept"] = {p: v.sent for p, v in layer.dispatcher.traffic.phases.items()} == eager_traffic
        out["path"] = layer.experts.path
        try:  # dropless: the split sizes depend on the routing, so it cannot be recorded
            MoELayer(MoEConfig(**base), "alltoall").to(device)(torch.randn(8, 16, device=device))
            out["dropless"] = "no error"
        except RuntimeError as e:
            out["dropless"] = str(e)
    finally:
        dispatch_alltoall.capturing = lambda: False
    return out


def main():
    rank, world_size, device = runtime.setup()
    p = runtime.params()
    if p["mode"] == "capture_path":
        result = capture_path(rank, world_size, device)
    elif p["mode"] == "graph":
        cfg = MoEConfig(num_experts=4 * world_size, top_k=2, hidden_dim=64, ffn_dim=128)
        result = {bank: compare_graph_with_eager(cfg, 16, device, steps=3, experts=bank)
                  for bank in ("loop", "bmm", "grouped")}
        result = {bank: {"loss": r["loss"], "weights": r["weights"]} for bank, r in result.items()}
    every = [None] * world_size
    dist.all_gather_object(every, result)
    runtime.finish(every)


if __name__ == "__main__":
    runtime.run(main)
