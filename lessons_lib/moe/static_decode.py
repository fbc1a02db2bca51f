"""Decode with worst-case buffers: fixed shapes, no count exchange, no host read (lesson 15).

A decode step hands the MoE layer a few rows per rank. Lesson 03's all-to-all then spends most of its time not
moving rows but agreeing on how many: one all-to-all of the counts, and a host read of the split sizes, before
the rows can go. The low-latency idea (DeepEP's low-latency kernels are built on it) is to size every buffer
for the worst case once, so that no size ever has to be asked for:

    every rank sends each expert exactly C = T_max slots (lesson 05's `static_dropless`: T_max tokens offer
    one expert at most T_max pairs, so nothing is dropped), and receives L · N · T_max rows.

Then every split size is known in advance, the pass never waits for the GPU, and it can be recorded into a
CUDA graph (lesson 05) and replayed with one launch. The price is memory, and here also bytes: all_to_all_single
sends the empty slots too (DeepEP writes only the real rows into its worst-case buffers, and signals counts).

`StaticDecode(layer, max_tokens)` runs a layer built with `static_dropless(cfg)` on up to max_tokens rows per
rank, padded to max_tokens. With no count exchange nothing can tell the other ranks of a bad input, so what can
be checked is checked once, at construction, on every rank together (the same max_tokens everywhere); a call's
input is checked before anything is sent and copied into the fixed buffer, and a wrong one raises on its rank
only, before any collective (every rank of an SPMD decode loop passes the same kind of input, so all raise
alike). The hash router's token ids (lesson 06) are checked there too, which costs the one host read of them.
"""
from __future__ import annotations

import torch

from .capacity import expert_capacity
from .config import ROUTES_BY_ID
from .cuda_graph import check_same_tokens
from .dispatch_alltoall import AllToAllDispatcher


class StaticDecode:
    """layer on x [T <= max_tokens, H] -> y [T, H], with fixed split sizes (graph=True: replayed from a CUDA graph).

    The output of a graph replay is a view of the graph's own buffer: the next call overwrites it. The layer's
    dispatcher takes its split sizes from the capacity (`AllToAllDispatcher.fixed_sizes`) only during this
    object's own passes; called directly, the layer exchanges counts as before. Several StaticDecode of different
    max_tokens may share one layer.
    """

    def __init__(self, layer, max_tokens: int, graph: bool = False, warmup: int = 2):
        cfg, device = layer.cfg, layer.device
        if not isinstance(layer.dispatcher, AllToAllDispatcher) or not cfg.pad_to_capacity:
            raise ValueError("StaticDecode needs the 'alltoall' dispatcher with static shapes: "
                             "MoELayer(static_dropless(cfg), 'alltoall', ...)")
        if max_tokens < 1:
            raise ValueError(f"StaticDecode needs max_tokens >= 1, got {max_tokens}")
        if expert_capacity(cfg, max_tokens) < max_tokens:
            raise ValueError(f"with capacity {expert_capacity(cfg, max_tokens)} < max_tokens={max_tokens} an expert "
                             "could drop rows: build the layer with capacity.static_dropless(cfg)")
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the layer on a CUDA device; it is on {device}")
        check_same_tokens(max_tokens, layer.dispatcher.group, device)  # every rank's C, hence every split, agrees
        self.layer, self.max_tokens = layer, max_tokens
        self.x_TH = torch.zeros(max_tokens, cfg.hidden_dim, device=device, dtype=cfg.torch_dtype)
        self.ids_T = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.graph = None
        if graph:
            self.graph = self._record(warmup)

    @torch.no_grad()
    def _forward(self) -> torch.Tensor:
        ids = self.ids_T if self.layer.cfg.router in ROUTES_BY_ID else None  # only lesson 06's id routers read ids
        dispatcher = self.layer.dispatcher
        dispatcher.fixed_sizes = True
        try:  # the buffers were checked when filled: the layer's own check of them cannot fail
            return self.layer(self.x_TH, token_ids=ids)[0]
        finally:
            dispatcher.fixed_sizes = False

    def _record(self, warmup: int):
        device = self.x_TH.device
        side = torch.cuda.Stream(device)  # warm up outside the recording, as PyTorch's CUDA graph notes ask
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.y_TH = self._forward()
        return graph

    def __call__(self, x_TH: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = x_TH.shape[0] if x_TH.dim() == 2 else -1
        if not 0 <= T <= self.max_tokens or x_TH.shape[1:] != self.x_TH.shape[1:] or x_TH.dtype != self.x_TH.dtype:
            raise ValueError(f"StaticDecode takes [tokens <= {self.max_tokens}, {self.x_TH.shape[1]}] "
                             f"{self.x_TH.dtype}, got {list(x_TH.shape)} {x_TH.dtype}")
        router = self.layer.cfg.router
        if router in ROUTES_BY_ID:
            if (not isinstance(token_ids, torch.Tensor) or token_ids.shape != (T,)
                    or token_ids.dtype not in (torch.int32, torch.int64)):
                raise ValueError(f"router={router!r} routes by token id: StaticDecode takes token_ids [{T}] int64 too")
            vocab = self.layer.cfg.vocab_size
            if T and (int(token_ids.min()) < 0 or (vocab is not None and int(token_ids.max()) >= vocab)):
                raise ValueError("StaticDecode token_ids must be >= 0" + (f" and < {vocab}" if vocab else ""))
            self.ids_T[:T].copy_(token_ids)
        self.x_TH[:T].copy_(x_TH)
        self.x_TH[T:].zero_()  # padding tokens: routed like any token, within capacity, and cut off below
        if self.graph is None:
            return self._forward()[:T]
        self.graph.replay()
        return self.y_TH[:T]
