"""One CUDA graph per training step: what lesson 05's static shapes buy on a GPU (lesson 05).

At the course's small shape a GPU training step does almost no arithmetic. It is bound by the host,
which launches about 200 kernels per step (forward, backward, AdamW) and waits for the all-to-all's
split sizes. A CUDA graph records every kernel of one step once and replays them all with one launch.
Recording has two rules: nothing may wait for the GPU (no .item(), .tolist(), no size read back),
and every shape and address is fixed when it is recorded.

Lesson 05's padded capacity obeys both: every rank sends exactly C rows to every expert, so every split
size is known in advance (`AllToAllDispatcher._static_sizes`). With C = T (`capacity.static_dropless`) nothing
is ever dropped, since T tokens offer an expert at most T pairs (a token picks k different experts). The
static layer then computes what the dropless one does, at the price of computing and sending the
empty slots:

    layer = MoELayer(capacity.static_dropless(cfg), "alltoall", "grouped", group).cuda()
    step = GraphedTrainStep(layer, x, target)   # warm up, record
    loss = step()                               # one replay: forward, backward, AdamW
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dispatch_alltoall import AllToAllDispatcher


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
        device = layer.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the layer on a CUDA device; it is on {device}")
        if not isinstance(layer.dispatcher, AllToAllDispatcher) or not layer.cfg.pad_to_capacity:
            raise ValueError("a graphed step needs the 'alltoall' dispatcher with static shapes: "
                             "MoELayer(static_dropless(cfg), 'alltoall', ...)")
        check_same_tokens(x.shape[0], layer.dispatcher.group, device)
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


def check_same_tokens(tokens: int, group, device) -> None:
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
