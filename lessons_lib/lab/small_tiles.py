"""An experiment of lesson 04: make `torch._grouped_mm` cut 64-row tiles, by adding empty groups. It does not pay.

On a Hopper GPU `torch._grouped_mm(x_MK, w_LKN, offs=...)` runs one of two CUTLASS kernels, picked from the
AVERAGE rows per group: up to 128, tiles of 64 rows (ping-pong schedule); above, tiles of 128 rows x 256 columns
(cooperative). A group's rows are cut into whole tiles, so a router's unequal groups leave about half a tile empty
per expert (`group_sizes` measures what that costs). Smaller tiles would waste less.

Empty groups cost the kernel no work but lower the average. `spread` turns L experts into G·(L-1)+1 groups: expert
e becomes group G·e and the G-1 groups after it hold no rows. The larger weight tensor is a view of the same memory
(group stride = expert stride / G; an empty group's weights are never read, and the last expert has none after it,
so the view stays inside the weights). `forced()` runs every grouped GEMM of its block that way, backward included.

`group_sizes` times it: the 64-row kernel is so much slower per row that it loses even on the router's unequal
groups (images/group_sizes_1xh100.json). The course's bank keeps torch's own choice.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

SMALL_TILE_MAX_AVERAGE = 128  # torch's rule: average rows per group at or below it -> 64-row tiles
MAX_GROUPS = 1024  # torch 2.11 refuses this many groups or more
_grouped_mm = getattr(torch, "_grouped_mm", None)  # torch's own, also while `forced` replaces it


def groups_per_expert(rows: int, experts: int, expert_stride: int, element_size: int) -> int:
    """G: the smallest power of two with rows / (G·(experts-1)+1) <= 128; 1 if there is a single expert, or the
    expert stride (elements) does not split into G 16-byte-aligned parts, or torch's limit on groups is hit."""
    if experts < 2:
        return 1
    G = 1
    while rows / (G * (experts - 1) + 1) > SMALL_TILE_MAX_AVERAGE:
        G *= 2
    if G > 1 and (expert_stride % (G * (16 // element_size)) or G * (experts - 1) + 1 >= MAX_GROUPS):
        return 1
    return G


def spread(weights_LKN: torch.Tensor, offs_L: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same experts as G·(L-1)+1 groups, every G-th holding one expert, the rest empty: (weights, offsets)
    for `torch._grouped_mm`. No copy: the weights are a view with the expert stride divided by G."""
    if G == 1:
        return weights_LKN, offs_L
    L = weights_LKN.shape[0]
    groups = G * (L - 1) + 1
    view = weights_LKN.as_strided((groups, *weights_LKN.shape[1:]),
                                  (weights_LKN.stride(0) // G, *weights_LKN.stride()[1:]))
    ends = offs_L.unsqueeze(1).expand(L, G).reshape(-1)[:groups]  # an empty group ends where its expert ends
    return view, ends


class SpreadGroupedMM(torch.autograd.Function):
    """out[rows of expert e] = x[rows of expert e] @ w[e] on the spread groups; backward: the input's gradient the
    same way, the weights' on the L groups (there the rows are reduced over: the tile rule does not apply)."""

    @staticmethod
    def forward(ctx, x_MK, w_LKN, offs_L, G: int):
        ctx.save_for_backward(x_MK, w_LKN, offs_L)
        ctx.G = G
        w, offs = spread(w_LKN, offs_L, G)
        return _grouped_mm(x_MK, w, offs=offs)

    @staticmethod
    def backward(ctx, grad_MN):
        x_MK, w_LKN, offs_L = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_t, offs = spread(w_LKN.transpose(1, 2), offs_L, ctx.G)
            grad_x = _grouped_mm(grad_MN, w_t, offs=offs)
        if ctx.needs_input_grad[1]:
            grad_w = _grouped_mm(x_MK.t(), grad_MN, offs=offs_L)
        return grad_x, grad_w, None, None


def grouped_mm(x_MK: torch.Tensor, w_LKN: torch.Tensor, offs_L: torch.Tensor, G: int) -> torch.Tensor:
    """`torch._grouped_mm(x_MK, w_LKN, offs=offs_L)` with G-1 empty groups after every expert but the last."""
    return _grouped_mm(x_MK, w_LKN, offs=offs_L) if G == 1 else SpreadGroupedMM.apply(x_MK, w_LKN, offs_L, G)


@contextmanager
def forced():
    """Inside the block, every `torch._grouped_mm(x [M, K], w [L, K, N], offs=...)` on a Hopper GPU runs with the
    empty groups that bring its average to 128 rows or fewer (64-row tiles); other calls are left as they are."""

    def small_tiles(a, b, offs=None, *args, **kwargs):
        hopper = b.is_cuda and torch.cuda.get_device_capability(b.device)[0] == 9
        if hopper and b.dim() == 3 and a.dim() == 2 and offs is not None and not args and not kwargs:
            return grouped_mm(a, b, offs, groups_per_expert(a.shape[0], b.shape[0], b.stride(0), b.element_size()))
        return _grouped_mm(a, b, offs, *args, **kwargs)

    torch._grouped_mm = small_tiles
    try:
        yield
    finally:
        torch._grouped_mm = _grouped_mm
