"""What every rank of a launched script runs around the notebook's cells.

setup(): prefixes the rank's output with "[rank r]", starts a watchdog that ends the
rank if torchrun dies, picks the device and joins the process group.
finish(result): rank 0 writes `result` as JSON for the notebook; all ranks leave the group and
the process ends there.
run(main): on an error, records which rank failed so the notebook can say so.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist


class _Prefixed:
    """A text stream that starts every line with a prefix, e.g. "[rank 1] ".

    Whole lines go out in one write, so the lines of two ranks sharing a pipe never mix."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._partial = stream, prefix, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self._stream.write("".join(f"{self._prefix}{line}\n" for line in lines))
            self._stream.flush()
        return len(text)

    def flush(self):
        if self._partial:
            self._stream.write(f"{self._prefix}{self._partial}\n")
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _watch_parent() -> None:
    # torchrun starts each rank in its own session, so a killed torchrun would leave
    # orphans behind; a rank whose parent changes ends itself.
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watchdog").start()


def setup():
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    sys.stdout = _Prefixed(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _Prefixed(sys.stderr, f"[rank {rank}] ")
    _watch_parent()
    backend = os.environ.get("LAUNCHER_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)  # binds the rank to its GPU up front
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend)
    return rank, dist.get_world_size(), device


def params() -> dict:
    """The `params` given to `launcher.run_script`."""
    return json.loads(os.environ.get("LAUNCHER_PARAMS") or "{}")


def _to_json(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"result holds a {type(obj).__name__}, which is not JSON data")


def finish(result) -> None:
    if dist.get_rank() == 0 and os.environ.get("LAUNCHER_RESULT"):
        try:
            text = json.dumps(result, default=_to_json, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`result` must be JSON data (dicts, lists, numbers, strings, tensors): {e}") from None
        with open(os.environ["LAUNCHER_RESULT"], "w") as f:
            f.write(text)
    dist.barrier()
    # Leave now, skipping destroy_process_group and the interpreter's and C++'s teardown: with
    # torch 2.13 + gloo, a background thread still alive at exit sometimes aborts the process
    # ("terminate called without an active exception") after all the work is done, and tearing
    # down many subgroups is one more place to wait. The OS closes the sockets; everything the
    # notebook needs was written above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(main) -> None:
    try:
        main()
    except SystemExit as e:
        if e.code in (0, None):  # a cell that ends the program on purpose is not a failure
            raise
        _record_failure()
    except BaseException:
        _record_failure()


def _record_failure() -> None:
    """Print the traceback, leave a marker naming this rank for the launcher, and end the process."""
    traceback.print_exc()
    run_dir = os.environ.get("LAUNCHER_RUN_DIR")
    if run_dir:
        with open(os.path.join(run_dir, f"failed-rank{os.environ.get('RANK', '?')}"), "w") as f:
            f.write(traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a process group whose peers are gone can hang in it.
    os._exit(1)
