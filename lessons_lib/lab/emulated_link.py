"""An emulated link: every all-to-all takes as long as it would on a link of a chosen speed (lesson 09).

Overlap hides an exchange behind work that does not need it. To see that, the exchange must take time while
using no core: on a GPU, NCCL's kernel moves the rows over NVLink while the SMs compute. On the course's 2-core
CPU machine it cannot: gloo copies the rows with a thread of its own, and two ranks on two cores leave that
thread no core to run beside the work. So the lesson gives the exchange a link of a known speed:

    with EmulatedLink(gb_per_s=0.5, latency_us=200):
        layer(x)   # every dist.all_to_all_single inside completes no sooner than latency + bytes / bandwidth

The real collective still runs underneath (started at once, asynchronously) and still moves the bytes; waiting
for it then sleeps until the link's time is up, and a sleeping process uses no core. Bytes are those this rank
sends to other ranks or receives from them, whichever is more (a full-duplex link); rows a rank keeps cost
nothing. This is a lab tool, not a network model: one link per rank, no contention between ranks, no topology.
What it shows is whether a schedule hides what it claims to hide, measured against a known exchange time.

In a torch.profiler trace each exchange shows as two ranges on the calling thread, "link N start Dus" (D: its
time on the link) and "link N wait"; `overlap_timeline.trace_bars` draws the exchange from its start until the
link's time is up, or until the wait ends if the real collective took longer.
"""
from __future__ import annotations

import itertools
import time

import torch
import torch.distributed as dist


class _Transfer:
    """The handle of one exchange on the link: `wait()` waits for the real collective, then for the link."""

    def __init__(self, work, done_at: float, name: str):
        self.work, self.done_at, self.name = work, done_at, name

    def wait(self, timeout=None) -> bool:
        with torch.profiler.record_function(f"{self.name} wait"):
            if self.work is not None:
                self.work.wait()
                self.work = None
            left = self.done_at - time.perf_counter()
            if left > 0:
                time.sleep(left)
        return True

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.done_at and (self.work is None or self.work.is_completed())


class EmulatedLink:
    """A context in which every `torch.distributed.all_to_all_single` takes at least `seconds(bytes)`.

    gb_per_s: the link's bandwidth, 10^9 bytes per second each way; latency_us: what every exchange costs
    whatever its size (launch, handshake, the first byte's flight). `exchanges` logs (bytes, seconds) of each
    exchange of this rank while the link was in place."""

    def __init__(self, gb_per_s: float, latency_us: float = 0.0):
        if not gb_per_s > 0 or latency_us < 0:
            raise ValueError(f"an emulated link needs gb_per_s > 0 and latency_us >= 0, got {gb_per_s}, {latency_us}")
        self.gb_per_s, self.latency_us = gb_per_s, latency_us
        self.exchanges: list[tuple[int, float]] = []
        self._real = None
        self._ids = itertools.count()

    def seconds(self, nbytes: int) -> float:
        """How long an exchange of `nbytes` (this rank's larger direction) takes on this link."""
        return self.latency_us * 1e-6 + nbytes / (self.gb_per_s * 1e9)

    def ms(self, nbytes: int) -> float:
        return 1e3 * self.seconds(nbytes)

    def __repr__(self) -> str:
        return f"EmulatedLink({self.gb_per_s:g} GB/s, {self.latency_us:g} us)"

    def __enter__(self) -> "EmulatedLink":
        if self._real is not None:
            raise RuntimeError("this EmulatedLink is already in place")
        self._real = dist.all_to_all_single
        dist.all_to_all_single = self._all_to_all_single
        return self

    def __exit__(self, *exc) -> None:
        if dist.all_to_all_single != self._all_to_all_single:  # another link entered after this one is still in
            raise RuntimeError("EmulatedLinks must be left in the order opposite to the one they were entered in")
        dist.all_to_all_single = self._real
        self._real = None

    def _all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                           async_op=False):
        if input.is_cuda:  # NCCL's wait only orders streams: a sleeping host would stall launches, not a link
            raise RuntimeError("EmulatedLink emulates a link for CPU ranks (gloo); between GPUs use the real one")
        nbytes = max(_remote_bytes(input, input_split_sizes, group), _remote_bytes(output, output_split_sizes, group))
        name, seconds = f"link {next(self._ids)}", self.seconds(nbytes)
        with torch.profiler.record_function(f"{name} start {round(seconds * 1e6)}us"):
            start = time.perf_counter()
            work = self._real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
        self.exchanges.append((nbytes, seconds))
        transfer = _Transfer(work, start + seconds, name)
        if async_op:
            return transfer
        transfer.wait()
        return None


def _remote_bytes(t: torch.Tensor, splits, group) -> int:
    """Bytes of `t`'s rows that belong to other ranks (split evenly when `splits` is None)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    rows = t.shape[0] if t.dim() else 1
    row_bytes = t.numel() * t.element_size() // rows if rows else 0
    if not splits:
        return rows * (size - 1) // size * row_bytes
    return sum(int(n) for r, n in enumerate(splits) if r != rank) * row_bytes
