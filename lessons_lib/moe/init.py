"""Deterministic weights of one MoE layer (defined in lesson 01), and lesson 06's hash of a token id.

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
    """Per-expert shapes of the stacked expert weights, by name: w1 [H, F] and w2 [F, H] for gelu; for swiglu
    w13 [H, 2F], Mixtral's w1 (the gate) and w3 (the up projection) side by side, and w2."""
    H, F = cfg.hidden_dim, cfg.ffn_dim
    if cfg.activation == "swiglu":
        return {"w13": (H, 2 * F), "w2": (F, H)}
    return {"w1": (H, F), "w2": (F, H)}


def first_weight_name(cfg: MoEConfig) -> str:
    """The name of the matrix an FFN's input meets first: "w13" for swiglu (gate and up side by side), else "w1"."""
    return "w13" if cfg.activation == "swiglu" else "w1"


def _draw(seed: int, name: str, index: int, fan_in: int, fan_out: int) -> torch.Tensor:
    """One matrix [fan_in, fan_out], fan-in scaled; w13 is drawn as w1 and w3 were, each from its own generator
    (so its weights are the same whether the two are stored apart or side by side)."""
    if name.endswith("w13"):
        gate, up = (_draw(seed, name[:-2] + n, index, fan_in, fan_out // 2) for n in "13")
        return torch.cat([gate, up], dim=-1)
    return torch.randn(fan_in, fan_out, generator=_generator(seed, name, index)) / math.sqrt(fan_in)


def init_router_weight(cfg: MoEConfig) -> torch.Tensor:
    """`router.weight` [E, H], std 1/sqrt(H) so unit-variance tokens give unit-variance logits."""
    g = _generator(cfg.seed, "router.weight")
    w = torch.randn(cfg.num_experts, cfg.hidden_dim, generator=g) / math.sqrt(cfg.hidden_dim)
    return w.to(cfg.torch_dtype)


_MOD = 2 ** 31  # values stay below 2^31, so a product with a multiplier below 2^31 fits in int64
_MULTIPLIERS = (1103515245, 1664525, 22695477)


def expert_hash(token_ids: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """[T, E] int64 pseudo-random scores in [0, 2^31), a fixed function of (seed, token id, expert)."""
    e_E = torch.arange(num_experts, device=token_ids.device)
    v = (token_ids.long().view(-1, 1) % _MOD) * num_experts + e_E + seed * 7919
    for a in _MULTIPLIERS:  # a few rounds of multiply-add and xor-shift mix the bits of all three
        v = (v % _MOD * a + 12345) % _MOD
        v = v ^ (v >> 15)
    return v


def hashed_table(cfg: MoEConfig, chunk: int = 4096) -> torch.Tensor:
    """[vocab_size, k] int64: the experts the random hash gives each token id (`TableRouter`'s default table),
    `chunk` ids at a time (the hash is [ids, E] wide: a whole vocabulary at once would take hundreds of MB)."""
    ids = torch.arange(cfg.vocab_size)
    return torch.cat([expert_hash(part, cfg.num_experts, cfg.seed).topk(cfg.top_k).indices
                      for part in ids.split(chunk)]) if cfg.vocab_size else ids.view(0, cfg.top_k)


def init_expert_weights(cfg: MoEConfig, experts: range) -> dict[str, torch.Tensor]:
    """Stacked weights of the given experts: w1 [e, H, F] (w13 [e, H, 2F] for swiglu) and w2 [e, F, H].

    Fan-in scaling keeps activations of order one through the expert.
    """
    out = {}
    for name, (fan_in, fan_out) in expert_weight_shapes(cfg).items():
        rows = [_draw(cfg.seed, f"experts.{name}", e, fan_in, fan_out) for e in experts]
        stacked = torch.stack(rows) if rows else torch.empty(0, fan_in, fan_out)
        out[name] = stacked.to(cfg.torch_dtype)
    return out


def shared_weight_shapes(cfg: MoEConfig) -> dict[str, tuple[int, int]]:
    """Shapes of the shared expert's weights (lesson 08), by name: none without cfg.shared_ffn_dim; w1 [H, S]
    (w13 [H, 2S] for swiglu), w2 [S, H], and gate [1, H] with cfg.shared_gate."""
    if cfg.shared_ffn_dim is None:
        return {}
    H, S = cfg.hidden_dim, cfg.shared_ffn_dim
    shapes = {first_weight_name(cfg): (H, (2 if cfg.activation == "swiglu" else 1) * S), "w2": (S, H)}
    if cfg.shared_gate:
        shapes["gate"] = (1, H)
    return shapes


def init_shared_weights(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The shared expert's weights (lesson 08), fan-in scaled like an expert's; every EP rank draws the same."""
    out = {}
    for name, (rows, cols) in shared_weight_shapes(cfg).items():
        fan_in, fan_out = (cols, rows) if name == "gate" else (rows, cols)  # gate [1, H] is stored transposed
        w = _draw(cfg.seed, f"shared.{name}", 0, fan_in, fan_out)
        out[name] = (w.t() if name == "gate" else w).to(cfg.torch_dtype)
    return out


def init_full_state_dict(cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The unsharded weights of one layer, under the names every layer variant loads:
    `router.weight` [E, H] (none for the hash router; the table router also has `router.tid2eid` [vocab, k]),
    `experts.w1` [E, H, F] (for swiglu `experts.w13`
    [E, H, 2F]: w1 and w3 side by side), `experts.w2` [E, F, H], and with a shared expert (lesson 08)
    `shared.w1` [H, S] (`shared.w13` [H, 2S]), `shared.w2` [S, H] and `shared.gate` [1, H].
    """
    sd = {} if cfg.router == "hash" else {"router.weight": init_router_weight(cfg)}
    if cfg.router == "table":  # lesson 06: the table by token id, the random hash's choice until one is loaded
        sd["router.tid2eid"] = hashed_table(cfg)
    for name, w in init_shared_weights(cfg).items():
        sd[f"shared.{name}"] = w
    for name, w in init_expert_weights(cfg, range(cfg.num_experts)).items():
        sd[f"experts.{name}"] = w
    return sd
