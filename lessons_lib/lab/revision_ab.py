"""The layer of an earlier git revision and of this checkout, timed side by side in one run (issue 21's CPU check).

A change made for one device must not slow another down. Timing the two revisions in two runs compares two
machines' moods as much as two codes: on a shared CPU, one run's medians differ from the next one's by more than
most changes are worth. Here both revisions live in one process: the earlier one's `lessons_lib` is taken out of
git (`git archive`) into a temporary folder under another package name (its imports are relative, so it imports
itself, not this checkout), each combination is built from both with the same config, hence the same weights, and
they take turns, round after round, on the same inputs, so that whatever the machine does falls on both alike.
A round's ratio is this checkout's median over the earlier revision's; their median over the rounds, and their
spread, are what the record says. The outputs and input gradients of the two are compared too: the same numbers,
or within what a change of summation order moves them.

    torchrun --standalone --nproc-per-node 2 -m lessons_lib.lab.revision_ab --before 1bb554b \\
        --out images/revision_ab_small_cpu.json

`--activation swiglu` runs the shape's config with SwiGLU instead (the small shape is GELU's).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ..moe.config import ACTIVATIONS
from ..moe.layer import MoELayer
from .records import record_header, redraw_record, write_record
from .shapes import SHAPES
from .timing import keep_freed_memory, median, timed_runs

REPO = Path(__file__).resolve().parents[2]


def git(*args: str, repo: Path = REPO) -> str:
    """The output of `git args…` in `repo`; a clear error where git or the revision is missing."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True)
    except FileNotFoundError:
        raise RuntimeError("revision_ab needs git on the PATH") from None
    except subprocess.CalledProcessError as e:
        raise ValueError(f"git {' '.join(args)} failed in {repo}: {e.stderr.decode().strip()}") from None
    return done.stdout.decode() if args[0] != "archive" else done.stdout


def load_revision(rev: str, repo: Path = REPO):
    """The `lessons_lib` of git revision `rev`, imported as a package of its own ("lessons_lib_<sha>") beside this
    checkout's: -> (that package, the full sha)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}", repo=repo).strip()
    name = f"lessons_lib_{sha[:12]}"
    if name not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="revision_ab_"))
        with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", sha, "lessons_lib", repo=repo))) as tar:
            tar.extractall(folder, filter="data")
        (folder / "lessons_lib").rename(folder / name)
        sys.path.insert(0, str(folder))
    return importlib.import_module(name), sha


def config_at(package, cfg):
    """`cfg` as the earlier revision's MoEConfig (which may lack options added since: they must be at default)."""
    theirs = package.moe.config.MoEConfig
    known = {f.name for f in dataclasses.fields(theirs)}
    ours = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    new_options = {k for k, v in ours.items() if k not in known and v != defaults[k]}
    if new_options:
        raise ValueError(f"revision has no config option(s) {sorted(new_options)}: compare at their defaults")
    return theirs(**{k: v for k, v in ours.items() if k in known})


def revision_times(package, cfg, combos, tokens: int, device, rounds: int = 30, steps: int = 10, warmup: int = 3,
                   group=None) -> dict:
    """{"d + e": {"before_ms", "after_ms" (median ms of forward + backward in each round), "ratio"
    (after / before in each round), "max_diff_y", "max_diff_grad_x"}} for each (dispatcher, experts) in `combos`,
    `package`'s layer ("before") against this checkout's ("after"), in alternating order round by round. Under
    torchrun: every rank calls it together."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype).requires_grad_()
    grad_y = torch.randn(tokens, cfg.hidden_dim, generator=g).to(device, cfg.torch_dtype)
    out = {}
    for d, e in combos:
        layers = {"before": package.MoELayer(config_at(package, cfg), d, e, group).to(device),
                  "after": MoELayer(cfg, d, e, group).to(device)}

        def fwd_bwd(layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y = layer(x)[0]
            y.backward(grad_y)
            return y.detach(), x.grad

        (y0, gx0), (y1, gx1) = fwd_bwd(layers["before"]), fwd_bwd(layers["after"])
        times = {"before": [], "after": []}
        for r in range(rounds):
            for which in ("before", "after") if r % 2 == 0 else ("after", "before"):
                layer = layers[which]
                times[which].append(median(timed_runs(lambda: fwd_bwd(layer), steps, warmup, device, group)))
        out[f"{d} + {e}"] = {"before_ms": times["before"], "after_ms": times["after"],
                             "ratio": [a / b for a, b in zip(times["after"], times["before"])],
                             "max_diff_y": (y1 - y0).abs().max().item(),
                             "max_diff_grad_x": (gx1 - gx0).abs().max().item()}
    return out


def plot_record(record: dict):
    """Each combination's after / before ratio: the median over the rounds, and the middle half of the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(runs) + 1.4))
    for i, r in enumerate(runs.values()):
        q1, _, q3 = statistics.quantiles(r["ratio"], n=4)
        ax.plot([q1, q3], [i, i], "-", color="tab:blue", lw=4, alpha=0.4)
        ax.plot(median(r["ratio"]), i, "o", color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(runs)), list(runs))
    ax.invert_yaxis()
    ax.set_xlabel("fwd + bwd time, after / before\n(dot: median of the rounds; bar: their middle half)")
    shape = record["shape"] + (f", {record['activation']}" if "activation" in record else "")
    ax.set_title(f"{record['after'][:7]} against {record['before'][:7]}, {shape} shape, {record['device']} × "
                 f"{record['world_size']}, {len(next(iter(runs.values()))['ratio'])} rounds", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    from .torchrun import init_from_torchrun, leave_torchrun

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="the earlier git revision (a sha, a tag, HEAD~3); needed unless --plot")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--activation", choices=ACTIVATIONS, help="the shape's config with this activation instead")
    p.add_argument("--dispatchers", nargs="+", default=["allgather", "alltoall"])
    p.add_argument("--experts", nargs="+", default=["loop", "bmm", "grouped"])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="images/revision_ab_small_cpu.json")
    p.add_argument("--plot", action="store_true", help="only redraw OUT's figure (OUT with .png) from OUT")
    a = p.parse_args(argv)
    if a.plot:
        return redraw_record(a.out, plot_record)
    if a.before is None:
        p.error("--before REVISION is needed (the revision to time this checkout against)")
    package, sha = load_revision(a.before)  # every rank, before any collective: a bad revision stops them all
    device = init_from_torchrun("lessons_lib.lab.revision_ab")
    if device.type == "cpu":
        keep_freed_memory()  # as the benchmark does
    cfg, sizes = SHAPES[a.shape]
    if a.activation is not None:
        cfg = dataclasses.replace(cfg, activation=a.activation)
    record = record_header("lessons_lib.lab.revision_ab", device, argv)
    record |= {"shape": a.shape, "activation": cfg.activation, "tokens_per_rank": sizes[0], "before": sha,
               "after": git("rev-parse", "HEAD").strip(),
               "after_uncommitted_changes": bool(git("status", "--porcelain", "--", "lessons_lib/moe").strip())}
    combos = [(d, e) for d in a.dispatchers for e in a.experts]
    record["runs"] = revision_times(package, cfg, combos, sizes[0], device, a.rounds, a.steps)
    if dist.get_rank() == 0:
        for combo, r in record["runs"].items():
            q1, _, q3 = statistics.quantiles(r["ratio"], n=4)
            print(f"{combo:20s} before {median(r['before_ms']):7.2f} ms  after {median(r['after_ms']):7.2f} ms  "
                  f"after/before {median(r['ratio']):.3f} (half the rounds {q1:.3f} to {q3:.3f})  "
                  f"max |Δy| {r['max_diff_y']:.1e}, |Δ grad x| {r['max_diff_grad_x']:.1e}", flush=True)
        write_record(record, a.out, plot_record)
    leave_torchrun()


if __name__ == "__main__":
    main()
