"""The header every committed measurement record starts with (used by every `python -m lessons_lib.lab.…`).

A number in a lesson is only as good as what says where it came from: the device, the torch version, the
date and the exact command. `record_header` writes those four (and the world size and backend of a
distributed run) the same way for every record under images/; `record_arguments`, `write_record` and
`redraw_record` are the --out/--plot command line and the JSON + figure files the GPU records share.
"""
from __future__ import annotations

import argparse
import datetime
import json
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


def record_arguments(description: str, default_out: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments every GPU record's command takes: --out (the JSON; its figure is the same name with .png) and
    --plot (only redraw that figure from the JSON, on any machine)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out)
    p.add_argument("--plot", action="store_true", help="only redraw OUT's figure (OUT with .png) from OUT")
    return p.parse_args(argv)


def draw_record(record: dict, out: str, plot_record) -> None:
    """Save `plot_record(record)`, the figure of the record written to `out`, beside it as .png."""
    plot_record(record).savefig(out.replace(".json", ".png"), dpi=110)


def redraw_record(out: str, plot_record) -> None:
    """The figure of the committed record `out`, drawn again from its JSON."""
    with open(out) as f:
        draw_record(json.load(f), out, plot_record)


def write_record(record: dict, out: str, plot_record=None) -> None:
    """Write the record's JSON to `out` and, given its `plot_record`, its figure beside it."""
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    if plot_record is not None:
        draw_record(record, out, plot_record)
