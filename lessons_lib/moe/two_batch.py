"""Two micro-batches: one half's experts run while the other half's rows travel (lesson 09).

A step's T tokens are split into halves a and b. With lesson 03's all-to-all, one half's communication can
hide behind the other half's computation (DeepSeek's two-batch overlap; SGLang's TBO does it per layer):

    dispatch a | dispatch b  ‖ experts a | combine a  ‖ experts b | (wait) combine b

(‖: runs while the exchange on its left is in flight.) Each half is routed, dispatched and combined exactly as
the whole step would be: in a dropless layer a token's output does not depend on the other tokens, so the split
output equals the unsplit layer's (with capacity, lesson 05, each half would have its own C: refused).
The work beside each exchange is handed over as lesson 09's shared expert is (`overlap.SharedBeside`: gloo's
exchange is started with async_op and waited for after; on a GPU the work runs on a side stream).
For inference (no autograd); with a shared expert, it runs beside the first half's dispatch.
"""
from __future__ import annotations

from functools import partial

import torch

from .dispatch_alltoall import AllToAllDispatcher
from .overlap import SharedBeside


@torch.no_grad()
def two_batch_forward(layer, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None,
                      overlap: bool = True) -> torch.Tensor:
    """layer(x_TH)[0], computed as two micro-batches; overlap=False runs the same steps one after the other."""
    if not isinstance(layer.dispatcher, AllToAllDispatcher) or layer.replicas is not None:
        raise ValueError("two micro-batches need the 'alltoall' dispatcher without a placement")
    if layer.cfg.capacity_factor is not None:  # C = ceil(k·T/E·c) of each half would drop other pairs than the whole
        raise ValueError("two micro-batches need a dropless layer (capacity_factor=None): a half's capacity "
                         "would drop other pairs than the whole step's")
    layer.check_input(x_TH, token_ids)
    half = (x_TH.shape[0] + 1) // 2
    xs = x_TH[:half], x_TH[half:]
    ids = (None, None) if token_ids is None else (token_ids[:half], token_ids[half:])
    ra, rb = (layer.route(x, i) for x, i in zip(xs, ids))
    shared = SharedBeside(layer.shared, x_TH, overlap) if layer.shared is not None else None

    rows_a, counts_a, state_a = layer.dispatch(xs[0], ra, shared)
    experts_a = SharedBeside(partial(layer.run_experts, counts_L=counts_a, state=state_a), rows_a, overlap)
    rows_b, counts_b, state_b = layer.dispatch(xs[1], rb, experts_a)  # a's experts while b's rows travel
    experts_b = SharedBeside(partial(layer.run_experts, counts_L=counts_b, state=state_b), rows_b, overlap)
    y_a = layer.combine(experts_a.result(), state_a, experts_b)  # b's experts while a's results travel back
    y_b = layer.combine(experts_b.result(), state_b)
    y_TH = torch.cat([y_a, y_b])
    return y_TH + shared.result() if shared is not None else y_TH
