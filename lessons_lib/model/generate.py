"""Greedy generation with a KV cache (lesson 14).

    prefill: the whole prompt [B, P] in one forward, which fills the cache for positions 0..P-1;
    decode:  one token per sequence per step, at position P, P+1, …: each step reads the cache, adds one row.

Prefill hands the MoE layer B·P rows at once (thousands per rank: bandwidth- and compute-bound); a decode step
hands it B rows (a few to a few hundred: latency-bound). Under expert parallelism every rank holds its own
sequences, and every rank must run the same number of forwards, since each forward's MoE layers exchange rows
with all the others: so every rank generates the same number of new tokens, whatever its prompts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .transformer import KVCache, MoETransformer


@torch.no_grad()
def generate(model: MoETransformer, prompt_BP: torch.Tensor, new_tokens: int):
    """-> (ids [B, P + new_tokens], logits [new_tokens, B, V] fp32): each new token is the argmax of its logits.

    Under EP every rank of the MoE layers' group calls this together with the same new_tokens (B and P may
    differ between ranks). A bad argument on any rank is a ValueError on every rank, raised before any exchange.
    """
    problem = _problem(model, prompt_BP, new_tokens)
    _raise_on_every_rank(model, problem, new_tokens)
    B, P = prompt_BP.shape
    cache = KVCache.empty(model.cfg, B, P + new_tokens, model.device, model.cfg.moe.torch_dtype)
    ids, all_logits = prompt_BP, []
    logits_BV = model(prompt_BP, cache, start=0)[0][:, -1]  # prefill
    for step in range(new_tokens):
        next_B1 = logits_BV.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_B1], dim=1)
        all_logits.append(logits_BV)
        if step + 1 < new_tokens:  # decode: one position per sequence
            logits_BV = model(next_B1, cache, start=P + step)[0][:, -1]
    return ids, torch.stack(all_logits) if all_logits else logits_BV.new_empty(0, B, model.cfg.vocab_size)


def _problem(model: MoETransformer, prompt_BP, new_tokens) -> str | None:
    cfg = model.cfg
    if not isinstance(prompt_BP, torch.Tensor) or prompt_BP.dim() != 2 or prompt_BP.dtype != torch.long:
        return f"prompt must be an int64 tensor [batch, length], got {getattr(prompt_BP, 'shape', prompt_BP)!r}"
    if prompt_BP.shape[1] < 1:
        return "prompt must have at least one token per sequence"
    if prompt_BP.device != model.device:
        return f"prompt is on {prompt_BP.device}, the model on {model.device}"
    if not isinstance(new_tokens, int) or new_tokens < 0:
        return f"new_tokens must be an int >= 0, got {new_tokens!r}"
    if prompt_BP.shape[1] + new_tokens > cfg.max_seq_len:
        return f"prompt ({prompt_BP.shape[1]}) + new_tokens ({new_tokens}) exceeds max_seq_len={cfg.max_seq_len}"
    if prompt_BP.numel() and not 0 <= int(prompt_BP.min()) <= int(prompt_BP.max()) < cfg.vocab_size:
        return f"prompt ids must lie in [0, vocab_size={cfg.vocab_size})"
    return None


def _raise_on_every_rank(model: MoETransformer, problem: str | None, new_tokens) -> None:
    """One small all-reduce before any MoE exchange: if any rank's arguments are bad, or the ranks ask for
    different numbers of new tokens, every rank raises."""
    dispatcher = model.blocks[0].moe.dispatcher
    if dispatcher.collective and dist.is_initialized():
        # [bad, new_tokens, -new_tokens]: the max of each says whether any rank is bad, and whether they all agree
        n = new_tokens if isinstance(new_tokens, int) else 0
        flags = torch.tensor([problem is not None, n, -n], dtype=torch.int64, device=model.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=dispatcher.group)
        bad, most, fewest = flags[0].item(), flags[1].item(), -flags[2].item()
        if problem is None and bad:
            problem = "another rank's generate() arguments were invalid; every rank stops"
        elif problem is None and most != fewest:
            problem = (f"every rank must generate the same number of tokens (each step's MoE layers exchange rows "
                       f"with every rank); got from {fewest} to {most}")
    if problem is not None:
        raise ValueError(problem)
