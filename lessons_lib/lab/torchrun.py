"""Starting and ending a `python -m lessons_lib.lab.…` measurement under torchrun (used by lessons 03 to 07).

Every measurement module runs on every rank: `torchrun --standalone --nproc-per-node N -m lessons_lib.lab.bench`.
Started without torchrun, it says so in one line instead of failing inside `init_process_group`.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def init_from_torchrun(module: str) -> torch.device:
    """Join the process group torchrun describes and return this rank's device: nccl and cuda:LOCAL_RANK when
    there are GPUs, gloo and the CPU otherwise. `module` (say "lessons_lib.lab.bench") names the command for the
    message given when this process was not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"{module} runs on every rank under torchrun: "
                         f"torchrun --standalone --nproc-per-node 2 -m {module} {' '.join(sys.argv[1:])}".rstrip()
                         + ("  (or: make bench)" if module.endswith(".bench") else ""))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # binds the rank to its GPU up front
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def leave_torchrun() -> None:
    """End a measurement: wait for every rank, flush, and exit without tearing the process group down. torch 2.13
    with gloo sometimes aborts inside that teardown after the work is done ("terminate called without an active
    exception"); the launcher's ranks end the same way."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
