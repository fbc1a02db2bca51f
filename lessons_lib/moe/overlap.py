"""The shared expert in the shadow of the dispatch (lesson 09).

The shared expert needs no communication, so it can run while the dispatch's rows are on the wire:

    routing -> count exchange -> [start the rows' all-to-all] -> shared expert -> [wait] -> experts -> combine

`SharedBeside` is that work, handed to the dispatcher as `dispatch(x, routing, beside=...)`. The all-to-all
dispatcher (lesson 03) calls it between starting its rows' exchange and waiting for it; a dispatcher with
nothing in flight calls it first. Where it waits depends on the device:

- gloo (CPU): the rows' all-to-all is started with `async_op=True`, so gloo's own thread moves the rows while
  this thread computes the shared expert; `wait()` comes after. In backward the same pair runs mirrored: the
  gradient of the received rows starts back, the shared expert's backward runs, then the wait
  (`dispatch_alltoall.StartAllToAll`, `FinishAllToAll`).
- CUDA: NCCL runs on its own stream, but every kernel queued on the current stream after the exchange waits for
  it. So the shared expert is queued on a side stream, which first waits for the current stream (its input is
  ready), and the current stream waits for the side stream before the sum. `record_stream` tells the caching
  allocator that a tensor made on one stream is used on the other, so its memory is not handed out again while
  the other stream may still read it. Autograd runs each backward kernel on its forward's stream.

`overlap=False` runs the same operations in the same order, with a blocking exchange and on one stream, so the
two compute exactly the same values (lesson 09 asserts bitwise equality).
"""
from __future__ import annotations

import torch

_SIDE_STREAMS: dict = {}  # one side stream per device, made once


def side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class SharedBeside:
    """The shared expert on x_TH, run when the dispatcher calls it (once), read with `result()`.

    overlap: whether the dispatcher may keep its rows in flight meanwhile (gloo: async_op) and whether, on a
    GPU, the shared expert runs on a side stream.
    """

    def __init__(self, shared, x_TH: torch.Tensor, overlap: bool):
        self.shared, self.x_TH, self.overlap = shared, x_TH, overlap
        self.out_TH = None
        self.stream = None

    def __call__(self) -> None:
        if self.out_TH is not None:
            return
        x = self.x_TH
        if self.overlap and x.is_cuda:
            self.stream = side_stream(x.device)
            self.stream.wait_stream(torch.cuda.current_stream(x.device))  # x is ready
            with torch.cuda.stream(self.stream):
                self.out_TH = self.shared(x)
            x.record_stream(self.stream)  # x was made on the current stream and is read on the side one
        else:
            self.out_TH = self.shared(x)

    def result(self) -> torch.Tensor:
        """The shared expert's output, ready for the current stream (run now if no dispatcher called it)."""
        self()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.x_TH.device)
            current.wait_stream(self.stream)
            self.out_TH.record_stream(current)  # made on the side stream, read on the current one
        return self.out_TH
