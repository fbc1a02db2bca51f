"""The course's layers against the published notebook's, like for like and in one run (lessons 02 and 03).

The notebook this course grew out of is not part of the course; its code, with a timing script, is kept beside it
(`../shared/published_notebook/time_published.py` in the course's own workspace). This module runs that script and
times the course's layers the same way, alternating the two in rounds so that both see the same machine:

    python -m lessons_lib.lab.published_comparison --published PATH/time_published.py \
        --out images/published_vs_course_cpu.json

Both sides: the published setting (16 experts, top-2, hidden 256, FFN 1024, fp32, 32 tokens per rank, 2 gloo
ranks), the same step (fresh random tokens, MSE to a frozen linear map + 0.01 · aux loss, zero_grad, backward,
AdamW lr 5e-4), the same optimizer implementation (torch's default AdamW, or fused) and the same process settings
(glibc's malloc as it is, or `timing.keep_freed_memory`), the median of the slowest rank's steps after 10 warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..moe.config import MoEConfig
from ..moe.layer import MoELayer
from .records import record_header
from .shapes import SHAPES
from .timing import keep_freed_memory

LAYERS = (("allgather", "loop"), ("alltoall", "loop"), ("alltoall", "grouped"))  # lessons 02, 03, and the final one
OPTIMIZERS = {"default": {}, "fused": {"fused": True}}


def course_step_ms(cfg: MoEConfig, dispatcher: str, experts: str, tokens: int, optimizer: str, steps: int,
                   device) -> float:
    """The published timing script's loop, around a course layer: median ms of the slowest rank's steps after 10."""
    layer = MoELayer(cfg, dispatcher, experts).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=5e-4, **OPTIMIZERS[optimizer])
    target = torch.nn.Linear(cfg.hidden_dim, cfg.hidden_dim, bias=False).to(device).requires_grad_(False)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = torch.randn(tokens, cfg.hidden_dim, device=device)
        y, aux = layer(x)
        loss = torch.nn.functional.mse_loss(y, target(x)) + 1e-2 * aux.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times[10:], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()) * 1e3


def _worker(args) -> None:
    """Under torchrun: time every course layer of LAYERS; rank 0 prints one JSON line."""
    from .torchrun import init_from_torchrun, leave_torchrun

    if args.keep_freed_memory:
        keep_freed_memory()
    device = init_from_torchrun("lessons_lib.lab.published_comparison")
    torch.manual_seed(0)
    cfg = SHAPES["small"][0]
    ms = {f"{d}+{e}": course_step_ms(cfg, d, e, args.tokens, args.optimizer, args.steps, device) for d, e in LAYERS}
    if dist.get_rank() == 0:
        print("COURSE " + json.dumps(ms), flush=True)
    leave_torchrun()


def _torchrun(script_args: list[str], nproc: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def compare(published: Path, rounds: int, steps: int, tokens: int, nproc: int) -> list[dict]:
    """Every (optimizer, malloc setting): the published step and the course's, alternating, `rounds` times."""
    runs = []
    for r in range(rounds):
        for optimizer in OPTIMIZERS:
            for keep in (False, True):
                flags = ["--optimizer", optimizer] + (["--keep-freed-memory"] if keep else [])
                out = _torchrun([str(published), "--steps", str(steps), "--tokens", str(tokens), *flags], nproc)
                pub = float(re.search(r"PUBLISHED ms/step=([\d.]+)", out).group(1))
                out = _torchrun(["-m", "lessons_lib.lab.published_comparison", "--course-step", "--steps", str(steps),
                                 "--tokens", str(tokens), *flags], nproc)
                course = json.loads(out.split("COURSE ", 1)[1].splitlines()[0])
                runs.append({"round": r, "optimizer": optimizer, "keep_freed_memory": keep, "published_ms": pub,
                             "course_ms": course})
                print(json.dumps(runs[-1]), flush=True)
    return runs


def summary(record: dict) -> list[dict]:
    """Per (optimizer, malloc setting): the range over rounds of each side, and the published / course ratio."""
    rows = []
    for optimizer in OPTIMIZERS:
        for keep in (False, True):
            runs = [r for r in record["runs"] if r["optimizer"] == optimizer and r["keep_freed_memory"] == keep]
            row = {"optimizer": optimizer, "keep_freed_memory": keep,
                   "published_ms": [min(r["published_ms"] for r in runs), max(r["published_ms"] for r in runs)]}
            for d, e in LAYERS:
                key = f"{d}+{e}"
                row[key] = [min(r["course_ms"][key] for r in runs), max(r["course_ms"][key] for r in runs)]
                row[f"speedup {key}"] = statistics.median(r["published_ms"] / r["course_ms"][key] for r in runs)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", type=Path, help="the published notebook's time_published.py")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--course-step", action="store_true", help="(internal) the course's side, under torchrun")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="default")
    ap.add_argument("--keep-freed-memory", action="store_true")
    args = ap.parse_args(argv)
    if args.course_step:
        return _worker(args)
    if args.published is None or not args.published.is_file():
        raise SystemExit("--published must name the published notebook's time_published.py")
    runs = compare(args.published.resolve(), args.rounds, args.steps, args.tokens, args.nproc)
    record = {**record_header("lessons_lib.lab.published_comparison", torch.device("cpu"), argv, torchrun=False),
              "world_size": args.nproc, "backend": "gloo", "tokens_per_rank": args.tokens, "steps": args.steps,
              "config": vars(SHAPES["small"][0]).copy(), "runs": runs}
    record["summary"] = summary(record)
    print(json.dumps(record["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()


def show_comparison(record: dict, layers: dict[str, str]) -> tuple[dict, dict]:
    """In a lesson (02, 03): the record's header, then for each optimizer × malloc setting the published notebook's
    range of step times over the rounds and each of `layers` ({"alltoall+loop": "lesson 03", ...}), with the median
    published / course ratio (above 1: the course is faster). Returns (ratio, overlap), keyed by
    ((optimizer, keep_freed_memory), layer); overlap says whether the two ranges over the rounds overlap."""
    rounds = len({r["round"] for r in record["runs"]})
    print(f"{record['device']}, torch {record['torch']}, {record['date']}; {record['world_size']} {record['backend']} "
          f"ranks, {record['tokens_per_rank']} tokens per rank, {record['steps']} steps per timing, {rounds} rounds")
    print(f"  {record['command']}")
    print(f"{'optimizer':9s} {'malloc':17s} {'published ms':>14s}" + "".join(f" {n + ' ms':>16s}  ratio"
                                                                          for n in layers.values()))
    ratio, overlap = {}, {}
    for row in record["summary"]:
        setting = (row["optimizer"], row["keep_freed_memory"])
        pub = row["published_ms"]
        malloc = "keep_freed_memory" if setting[1] else "as it is"
        line = f"{row['optimizer']:9s} {malloc:17s} {pub[0]:6.1f} to {pub[1]:4.1f}"
        for key in layers:
            ratio[setting, key] = row[f"speedup {key}"]
            overlap[setting, key] = max(pub[0], row[key][0]) <= min(pub[1], row[key][1])
            mark = "*" if overlap[setting, key] else " "
            line += f"   {row[key][0]:6.1f} to {row[key][1]:4.1f}  {ratio[setting, key]:5.2f}{mark}"
        print(line)
    print("* the course's range over the rounds overlaps the published one")
    return ratio, overlap
