"""Progress that reads as progress, live or headless (lessons 01, 05, 06: the toy training runs).

In a live notebook a labelled widget bar, and a plain-text summary line when it ends, which is what stays in the
saved notebook. Where no widget can render (papermill, nbconvert, the course's own runs and tests) a plain line at
each quarter and the same summary: no bar written to stderr, which an executed notebook shows as a red error block.
In a terminal, tqdm's text bar.
"""
from __future__ import annotations

import sys
import time

from .figures import widgets_available


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class Progress:
    """for step in range(n): ...; bar.step(loss=...)   then bar.close(): `n` steps of a run called `desc`."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done, self.start = total, desc, 0, time.monotonic()
        self.postfix: dict = {}
        self.mode = "off" if not enabled else ("widget" if widgets_available() else "text") if _in_notebook() \
            else "terminal"
        self.bar = None
        if self.mode == "widget":
            from tqdm.notebook import tqdm
            self.bar = tqdm(total=total, desc=desc)
        elif self.mode == "terminal":
            from tqdm.std import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.5)

    def _values(self) -> str:
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.postfix.items())

    def step(self, **postfix) -> None:
        self.done += 1
        self.postfix = postfix
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)
        elif self.mode == "text" and self.done < self.total and self.done % max(1, self.total // 4) == 0:
            print(f"{self.desc}: step {self.done}/{self.total}, {self._values()}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode in ("widget", "text"):
            print(f"{self.desc}: {self.done} steps in {time.monotonic() - self.start:.1f} s, {self._values()}",
                  flush=True)
