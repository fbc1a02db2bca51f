"""A toy task and a training loop for the lessons (lesson 01; lesson 06 uses the clusters).

The task is the published notebook's: fit a frozen random linear map, target = x · A.
Inputs are Gaussian, or drawn around a few cluster centres: clustered tokens look
alike to the router, which is what lets routing collapse onto a few experts in lesson 06.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..lab.progress import Progress
from ..moe.distributed import all_reduce_grads
from ..moe.load_balancing import SigmoidBiasRouter, update_expert_bias

INPUTS = ("gaussian", "clusters")


@dataclass
class ToyTask:
    """Tokens x [T, H] and their targets x · A, A a frozen random [H, H] map."""

    hidden_dim: int
    inputs: str = "gaussian"
    num_clusters: int = 4
    cluster_spread: float = 0.1
    seed: int = 0
    target_map: torch.Tensor = field(init=False, repr=False)
    centres: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ValueError(f"ToyTask.inputs must be one of {list(INPUTS)}, got {self.inputs!r}")
        if self.hidden_dim <= 0 or self.num_clusters <= 0 or self.cluster_spread < 0:
            raise ValueError("ToyTask needs hidden_dim > 0, num_clusters > 0 and cluster_spread >= 0")
        g = torch.Generator().manual_seed(self.seed)
        self.target_map = torch.randn(self.hidden_dim, self.hidden_dim, generator=g) / math.sqrt(self.hidden_dim)
        self.centres = torch.randn(self.num_clusters, self.hidden_dim, generator=g)

    def sample(self, num_tokens: int, generator: torch.Generator, dtype=torch.float32, device="cpu"):
        """A batch (x, target), both [num_tokens, H], drawn from `generator` (on the CPU)."""
        if self.inputs == "gaussian":
            x = torch.randn(num_tokens, self.hidden_dim, generator=generator)
        else:
            which = torch.randint(self.num_clusters, (num_tokens,), generator=generator)
            noise = torch.randn(num_tokens, self.hidden_dim, generator=generator)
            x = self.centres[which] + self.cluster_spread * noise
        target = x @ self.target_map
        return x.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


@dataclass
class TrainLog:
    """Per-step records of `train`: task loss, aux loss, tokens per expert ([steps, E]) and
    the fraction of (token, slot) pairs dropped over capacity (lesson 05)."""

    loss: list[float]
    aux_loss: list[float]
    tokens_per_expert: np.ndarray
    drop_rate: list[float] = field(default_factory=list)

    def max_over_mean(self) -> np.ndarray:
        """Per step, the busiest expert's load over the mean load (1 = perfectly balanced)."""
        counts = self.tokens_per_expert.astype(float)
        return counts.max(axis=1) / counts.mean(axis=1)

    def tokens_per_rank(self, num_ranks: int) -> np.ndarray:
        """[steps, num_ranks]: the rows each rank would receive with the experts split over
        num_ranks expert-parallel ranks (rank r owns a contiguous block of E / num_ranks)."""
        steps, E = self.tokens_per_expert.shape
        if E % num_ranks:
            raise ValueError(f"{E} experts cannot be split evenly over {num_ranks} ranks")
        return self.tokens_per_expert.reshape(steps, num_ranks, E // num_ranks).sum(axis=2)


def train(layer, task: ToyTask, steps: int, tokens: int, lr: float = 3e-3, aux_coef: float = 0.0,
          seed: int = 0, rank: int = 0, group=None, progress: bool = True, z_coef: float = 0.0,
          bias_rate: float = 0.0, desc: str = "train") -> TrainLog:
    """Train `layer` on `task` with AdamW: loss = mse(y, target) + aux_coef · aux_loss + z_coef · z_loss.

    bias_rate > 0 (a "sigmoid_bias" router): after each optimizer step, DeepSeek-V3's
    aux-loss-free bias update with that rate (`load_balancing.update_expert_bias`, lesson 06).
    Every step draws `tokens` fresh tokens; `rank` offsets the data seed so the ranks of an
    expert-parallel run see different data. With `group`, the router's gradient is summed over
    the group (the experts' is already), so every rank keeps the same router; the logged losses are
    averaged and the tokens per expert summed over the group, so every rank logs the global view.
    `desc` labels the run's progress (rank 0 only; `progress=False`: none).
    """
    if steps <= 0 or tokens < 0:
        raise ValueError(f"train needs steps > 0 and tokens >= 0, got steps={steps}, tokens={tokens}")
    if min(aux_coef, z_coef, bias_rate) < 0:
        raise ValueError("train needs aux_coef, z_coef and bias_rate >= 0")
    if bias_rate and not isinstance(layer.router, SigmoidBiasRouter):
        raise ValueError(f"bias_rate needs a router with a balancing bias (cfg.router='sigmoid_bias'), "
                         f"not {layer.cfg.router!r}")
    device = next(layer.parameters()).device
    dtype = layer.cfg.torch_dtype
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    losses, aux_losses, counts, drops = [], [], [], []
    bar = Progress(steps, desc, enabled=progress and rank == 0)
    for _ in range(steps):
        x, target = task.sample(tokens, g, dtype=dtype, device=device)
        y, aux = layer(x)
        task_loss = F.mse_loss(y.float(), target.float())
        opt.zero_grad(set_to_none=True)
        (task_loss + aux_coef * aux.aux_loss + z_coef * aux.z_loss).backward()
        if group is not None and not layer.dispatcher.replicated_tokens:
            # Every rank holds a copy of the router (and of lesson 08's shared expert), and its gradient came from
            # this rank's tokens only (the experts' gradients already came back from every rank through the
            # all-to-all): sum it, or the copies drift apart.
            all_reduce_grads(layer.replicated_parameters(), group)
        if getattr(layer, "replicas", None) is not None:  # lesson 11: an expert's replicas saw different tokens
            layer.sum_replica_grads()
        opt.step()
        if bias_rate:
            update_expert_bias(layer.router, aux.tokens_per_expert, bias_rate, group)
        logged = torch.stack([task_loss.detach(), aux.aux_loss.detach()]).float()
        step_counts = torch.cat([aux.tokens_per_expert, aux.dropped.view(1)]).detach()  # pairs, then dropped
        if group is not None:
            dist.all_reduce(logged, group=group)
            logged /= dist.get_world_size(group)
            dist.all_reduce(step_counts, group=group)
        step_counts = step_counts.cpu()
        losses.append(logged[0].item())
        aux_losses.append(logged[1].item())
        drops.append(step_counts[-1].item() / max(1, int(step_counts[:-1].sum())))
        counts.append(step_counts[:-1].numpy())
        bar.step(loss=losses[-1])
    bar.close()
    return TrainLog(losses, aux_losses, np.stack(counts), drops)
