"""Deterministic weights of one MoE layer (defined in lesson 01).

Each tensor, and each expert's slice of the stacked expert weights, is drawn from
its own generator seeded by (seed, tensor name, expert index). So a rank that owns
experts 4..7 draws exactly the weights the single-device layer holds at rows 4..7,
without ever materialising the other experts: lesson 02 relies on this when it
checks an expert-parallel layer against the single-device one.
"""
from __future__ import annotations

import math
import zlib

import torch

from .config import MoEConfig


def _generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    # crc32 rather than hash(): Python's str hash changes between processes.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{index}".encode()))


def expert_weight_shapes(cfg: MoEConfig) -> dict[str, tuple[int, int]]:
    """Per-expert shapes of the stacked expert weights, by name."""
    H, F = cfg.hidden_dim, cfg.ffn_dim
    shapes = {"w1": (H, F), "w2": (F, H)}
    if cfg.activation == "swiglu":
        shapes["w3"] = (H, F)
    return shapes


def init_router_weight(cfg: MoEConfig) -> torch.Tensor:
    """`router.weight` [E, H], std 1/sqrt(H) so unit-variance tokens give unit-variance logits."""
    g = _generator(cfg.seed, "router.weight")
    w = torch.randn(cfg.num_experts, cfg.hidden_dim, generator=g) / math.sqrt(cfg.hidden_dim)
    return w.to(cfg.torch_dtype)


def init_expert_weights(cfg: MoEConfig, experts: range) -> dict[str, torch.Tensor]:
    """Stacked weights of the given experts: w1 [e, H, F], w2 [e, F, H] (and w3 [e, H, F]).

    Fan-in scaling keeps activations of order one through the expert.
    """
    out = {}
    for name, (fan_in, fan_out) in expert_weight_shapes(cfg).items():
        rows = [
            torch.randn(fan_in, fan_out, generator=_generator(cfg.seed, f"experts.{name}", e))
            / math.sqrt(fan_in)
            for e in experts
        ]
        stacked = torch.stack(rows) if rows else torch.empty(0, fan_in, fan_out)
        out[name] = stacked.to(cfg.torch_dtype)
    return out


def shared_weight_shapes(cfg: MoEConfig) -> dict[str, tuple[int, int]]:
    """Shapes of the shared expert's weights (lesson 08), by name: none without cfg.shared_ffn_dim."""
    if cfg.shared_ffn_dim is None:
        return {}
    H, S = cfg.hidden_dim, cfg.shared_ffn_dim
    shapes = {"w1": (H, S), "w2": (S, H)}
    if cfg.activation == "swiglu":
        shapes["w3"] = (H, S)
    if cfg.shared_gate:
        shapes["gate"] = (1, H)
    return shapes


def init_shared_weights(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The shared expert's weights (lesson 08), fan-in scaled like an expert's; every EP rank draws the same."""
    return {name: (torch.randn(*shape, generator=_generator(cfg.seed, f"shared.{name}"))
                   / math.sqrt(shape[0] if name != "gate" else shape[1])).to(cfg.torch_dtype)
            for name, shape in shared_weight_shapes(cfg).items()}


def init_full_state_dict(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The unsharded weights of one layer, under the names every layer variant loads:
    `router.weight` [E, H] (none for the hash router), `experts.w1` [E, H, F], `experts.w2` [E, F, H],
    `experts.w3` [E, H, F], and with a shared expert (lesson 08) `shared.w1` [H, S], `shared.w2` [S, H],
    `shared.w3` [H, S] and `shared.gate` [1, H].
    """
    sd = {} if cfg.router == "hash" else {"router.weight": init_router_weight(cfg)}
    for name, w in init_shared_weights(cfg).items():
        sd[f"shared.{name}"] = w
    for name, w in init_expert_weights(cfg, range(cfg.num_experts)).items():
        sd[f"experts.{name}"] = w
    return sd
