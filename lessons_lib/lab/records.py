"""The header every committed measurement record starts with (used by every `python -m lessons_lib.lab.…`).

A number in a lesson is only as good as what says where it came from: the device, the torch version, the
date and the exact command. `record_header` writes those four (and the world size and backend of a
distributed run) the same way for every record under images/.
"""
from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def record_header(module: str, device: torch.device, argv: list[str] | None = None, torchrun: bool = True) -> dict:
    """{"device", "torch", "date", "command"} (and "world_size", "backend" under torch.distributed) for a record
    made by `python -m module` (under torchrun, with torchrun: its command line names the world size)."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    header = {"device": device_name(device), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    if dist.is_initialized():
        header |= {"world_size": dist.get_world_size(), "backend": dist.get_backend()}
    if torchrun:
        n = dist.get_world_size() if dist.is_initialized() else 1
        header["command"] = f"torchrun --standalone --nproc-per-node {n} -m {module} {args}".rstrip()
    else:
        header["command"] = f"python -m {module} {args}".rstrip()
    return header
