"""A small decoder-only MoE transformer, to read top to bottom (lesson 14).

    ids [B, S] -> embedding + position -> N × Block -> RMSNorm -> head -> logits [B, S, V]
    Block: x = x + attention(norm(x)); x = x + moe(norm(x))

The attention is data-parallel: each rank holds its own sequences, their KV cache and a full copy of the
attention weights, and needs no communication. The MoE layer is the course's, with any dispatcher and bank:
it sees the B·S tokens of this rank's sequences as rows [T, H], and under EP its experts are spread over the
group. That is how DeepSeek-V3 is deployed (attention data-parallel, experts expert-parallel).

Every weight is drawn from `ModelConfig.seed` (the MoE layers' from their own `MoEConfig` seeds, lesson 01's
`init`), so the model built on any rank, and on one device, holds the same weights: lesson 14 checks that EP
generation produces exactly the tokens of single-device generation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.config import MoEConfig
from ..moe.layer import MoELayer


@dataclass(frozen=True)
class ModelConfig:
    """vocab_size V, num_layers N blocks, num_heads (hidden_dim % num_heads == 0), max_seq_len (positions);
    moe: every block's MoE layer (its hidden_dim is the model's width H, its dtype the model's)."""

    moe: MoEConfig = MoEConfig()
    vocab_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.moe.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.moe.hidden_dim} must be divisible by num_heads={self.num_heads}")
        if self.moe.vocab_size is not None and self.moe.vocab_size < self.vocab_size:  # lesson 06's table router
            raise ValueError(f"the MoE layers' table has {self.moe.vocab_size} rows, fewer than the model's "
                             f"vocab_size={self.vocab_size}: every token id needs a row")

    def block_moe(self, i: int) -> MoEConfig:
        """Block i's MoE layer: the same shape, its own weights."""
        return dataclasses.replace(self.moe, seed=self.moe.seed + 1009 * (i + 1))


@dataclass
class KVCache:
    """The keys and values of every position seen so far, per block: k[i], v[i] [B, heads, max_len, H/heads]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, cfg.num_heads, max_len, cfg.moe.hidden_dim // cfg.num_heads)
        new = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * cfg.num_layers)]
        return cls(new[::2], new[1::2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor | None = None,
           cache_v: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Causal attention of S new positions start .. start+S-1: q, k, v [B, heads, S, d] -> y [B, heads, S, d].

    With a cache (cache_k, cache_v [B, heads, max_len, d]), the new keys and values are written into it at
    positions start.. and each query attends to every position up to its own: the cached ones before it and the
    new ones up to it. Without a cache this is plain causal attention over the S positions (start unused).
    """
    S = q.shape[2]
    if cache_k is not None:
        cache_k[:, :, start:start + S] = k
        cache_v[:, :, start:start + S] = v
        k, v = cache_k[:, :, :start + S], cache_v[:, :, :start + S]
    # the queries are the last S of the keys' positions: query i may see keys 0 .. (its position) = past + i
    past = k.shape[2] - S
    sees = torch.arange(k.shape[2], device=q.device) <= past + torch.arange(S, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sees)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (`attend`), with the block's slot of the KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.moe.hidden_dim
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.proj = nn.Linear(H, H, bias=False)

    def forward(self, x_BSH: torch.Tensor, cache: KVCache | None = None, block: int = 0, start: int = 0):
        B, S, H = x_BSH.shape
        q, k, v = (t.view(B, S, self.heads, H // self.heads).transpose(1, 2)
                   for t in self.qkv(x_BSH).split(H, dim=2))  # each [B, heads, S, H/heads]
        cached = (cache.k[block], cache.v[block]) if cache is not None else (None, None)
        y = attend(q, k, v, *cached, start=start)
        return self.proj(y.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, dispatcher: str, experts: str, group):
        super().__init__()
        H = cfg.moe.hidden_dim
        self.i = i
        self.norm1, self.norm2 = nn.RMSNorm(H), nn.RMSNorm(H)
        self.attention = CausalSelfAttention(cfg)
        self.moe = MoELayer(cfg.block_moe(i), dispatcher, experts, group)

    def forward(self, x_BSH, ids_BS, cache: KVCache | None = None, start: int = 0):
        B, S, H = x_BSH.shape
        x_BSH = x_BSH + self.attention(self.norm1(x_BSH), cache, self.i, start)
        # the MoE layer takes rows: this rank's B·S tokens (the hash router, lesson 06, routes by their ids)
        y_TH, aux = self.moe(self.norm2(x_BSH).reshape(B * S, H), token_ids=ids_BS.reshape(B * S))
        return x_BSH + y_TH.view(B, S, H), aux


class MoETransformer(nn.Module):
    """ids [B, S] -> (logits [B, S, V] in fp32, [MoEAux of each block]).

    dispatcher, experts, group: every block's MoE layer (`MoELayer`'s arguments); "local": one device.
    Called with a cache, the S tokens are the positions start .. start+S-1 of each sequence (`generate`).
    """

    def __init__(self, cfg: ModelConfig, dispatcher: str = "local", experts: str = "grouped", group=None):
        super().__init__()
        self.cfg = cfg
        H = cfg.moe.hidden_dim
        # The same seed on every rank draws the same attention, embedding and head weights; the MoE layers draw
        # theirs from their MoEConfig seeds (lesson 01), each rank only its own experts.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.embed = nn.Embedding(cfg.vocab_size, H)
            self.position = nn.Embedding(cfg.max_seq_len, H)
            self.blocks = nn.ModuleList(Block(cfg, i, dispatcher, experts, group) for i in range(cfg.num_layers))
            self.norm = nn.RMSNorm(H)
            self.head = nn.Linear(H, cfg.vocab_size, bias=False)
        # everything else in the model's dtype (the MoE layers already are, and keep their fp32 router state)
        dense = [self.embed, self.position, self.norm, self.head]
        for block in self.blocks:
            dense += [block.norm1, block.norm2, block.attention]
        for module in dense:
            module.to(cfg.moe.torch_dtype)

    def forward(self, ids_BS: torch.Tensor, cache: KVCache | None = None, start: int = 0):
        S = ids_BS.shape[1]
        positions = torch.arange(start, start + S, device=ids_BS.device)
        x_BSH = self.embed(ids_BS) + self.position(positions)
        auxes = []
        for block in self.blocks:
            x_BSH, aux = block(x_BSH, ids_BS, cache, start)
            auxes.append(aux)
        return self.head(self.norm(x_BSH)).float(), auxes

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device
