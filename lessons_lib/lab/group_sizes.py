"""What the sizes of the experts' groups cost the grouped GEMMs, the rows being the same (lesson 04).

`torch._grouped_mm` works on tiles of rows: a group of 513 rows takes as many row tiles as one of 640, so the same
rows run slower in unequal groups than in equal ones that fill every tile. `group_size_times` times the six GEMMs
of forward + backward (`limits.grouped_gemms_ms`) at the DeepSeek-V3-like shape on the same number of rows split
several ways: equal groups, the group sizes the layer's router gives the benchmark's tokens, those sizes rounded
up to whole tiles of 128 rows (more rows, all tiles full), and equal groups one row larger and 64 rows smaller than
an exact number of tiles; and the equal and routed sizes once more with empty groups added, which make torch's
kernel cut tiles of 64 rows (`small_tiles`, an experiment the bank does not use: it loses). The ways alternate in
rounds so that all see the GPU in the same state. `layer_times` then times the whole layer (`local` + `grouped`,
forward + backward) with torch's tiles and with 64-row ones, alternating too. On a GPU with the fast grouped GEMM
(bf16, Hopper):

    python -m lessons_lib.lab.group_sizes --out images/group_sizes_1xh200.json
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..moe.config import MoEConfig
from ..moe.experts_batched import grouped_mm_support
from ..moe.layer import MoELayer
from .limits import grouped_gemms_ms
from .records import record_arguments, record_header, redraw_record, write_record
from .shapes import REALISTIC
from .small_tiles import forced
from .timing import median, timed_runs

TILE = 128  # rows per tile in the grouped GEMM's kernel at this shape (the record shows it: 512 rows vs 513)
SPREAD = ", 64-row tiles"  # suffix of a way timed with empty groups added (`small_tiles`)


def bench_tokens(cfg: MoEConfig, tokens: int, device, seed: int = 1234) -> torch.Tensor:
    """[tokens, H] random tokens, drawn as the benchmark draws rank 0's (`bench.bench_one`)."""
    x = torch.randn(tokens, cfg.hidden_dim, generator=torch.Generator().manual_seed(seed))
    return x.to(device, cfg.torch_dtype)


def routed_sizes(cfg: MoEConfig, tokens: int, device, seed: int = 1234) -> list[int]:
    """Rows per expert that a `local` layer of `cfg` routes for `tokens` random tokens drawn as the benchmark draws
    rank 0's (`bench.bench_one`)."""
    layer = MoELayer(cfg, "local", "grouped").to(device)
    x = bench_tokens(cfg, tokens, device, seed)
    with torch.no_grad():
        _, counts_L, _ = layer.dispatch(x, layer.route(x))
    return counts_L.tolist()


def size_ways(routed: list[int], tile: int = TILE) -> dict[str, list[int]]:
    """The ways of splitting rows into len(routed) groups that `group_size_times` compares."""
    E, rows = len(routed), sum(routed)
    if rows % E:
        raise ValueError(f"{rows} rows do not split into {E} equal groups")
    m = rows // E
    return {"equal": [m] * E, "routed": list(routed),
            "routed, up to whole tiles": [-(-c // tile) * tile for c in routed],
            "equal, one row more": [m + 1] * E, f"equal, {tile // 2} rows fewer": [m - tile // 2] * E}


def group_size_times(cfg: MoEConfig, tokens: int, device, rounds: int = 4, steps: int = 10) -> dict:
    """{way: {"sizes": [...], "rows": n, "rounds_ms": [...], "median_ms": ms}} at `tokens` tokens (rows = tokens·k)."""
    ways = size_ways(routed_sizes(cfg, tokens, device))
    ways |= {w + SPREAD: ways[w] for w in ("equal", "routed")}
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, sizes in ways.items():
            with forced() if way.endswith(SPREAD) else nullcontext():
                times[way].append(grouped_gemms_ms(cfg, sum(sizes), device, steps, warmup=2, sizes=sizes))
    return {way: {"sizes": ways[way], "rows": sum(ways[way]), "rounds_ms": t, "median_ms": median(t)}
            for way, t in times.items()}


def layer_times(cfg: MoEConfig, tokens: int, device, rounds: int = 4, steps: int = 10) -> dict:
    """{"torch's tiles" / "64-row tiles": {"rounds_ms", "median_ms"}}: forward + backward (the input's gradient
    included, as `bench.bench_one`) of a `local` + `grouped` layer on the benchmark's tokens, as it is and inside
    `small_tiles.forced()`, alternating."""
    layer = MoELayer(cfg, "local", "grouped").to(device)
    x = bench_tokens(cfg, tokens, device).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, cfg.torch_dtype)

    def fwd_bwd():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x)[0].backward(grad)

    ways = {"torch's tiles": nullcontext, "64-row tiles": forced}
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, context in ways.items():
            with context():
                times[way].append(median(timed_runs(fwd_bwd, steps, 2, device, collective=False)))
    return {way: {"rounds_ms": t, "median_ms": median(t)} for way, t in times.items()}


def plot_record(record: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(8 * len(runs), 4), squeeze=False)
    for ax, (tokens, ways) in zip(axes[0], runs.items()):
        names = list(ways)
        ms = [ways[w]["median_ms"] for w in names]
        bars = ax.bar([n.replace(", ", ",\n") for n in names], ms, color=["C2", "C0", "C1", "C3", "C7", "C4", "C5"])
        for bar, w in zip(bars, names):
            s = ways[w]["sizes"]
            ax.annotate(f"{ways[w]['rows']} rows\n{min(s)}-{max(s)} per group", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set(ylabel="ms, the grouped GEMMs (fwd + bwd)", title=f"{tokens} tokens x top-{record['top_k']}")
        ax.set_ylim(0, 1.25 * max(ms))
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{record['device']}, torch {record['torch']}, {record['date']}: same GEMMs, groups of other sizes",
                 fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    a = record_arguments(__doc__.splitlines()[0], "images/group_sizes_1xh200.json", argv)
    if a.plot:
        return redraw_record(a.out, plot_record)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    ok, why = grouped_mm_support(device, REALISTIC.torch_dtype, REALISTIC)
    if not ok:
        raise SystemExit(f"this record needs the fast grouped GEMM: {why}")
    record = record_header("lessons_lib.lab.group_sizes", device, argv, torchrun=False)
    record |= {"top_k": REALISTIC.top_k, "num_experts": REALISTIC.num_experts, "runs": {}}
    for tokens in (4096, 8192):
        record["runs"][str(tokens)] = group_size_times(REALISTIC, tokens, device)
        print(tokens, {w: round(r["median_ms"], 2) for w, r in record["runs"][str(tokens)].items()}, flush=True)
    record["layer"] = {}
    for tokens in (4096, 8192):
        record["layer"][str(tokens)] = layer_times(REALISTIC, tokens, device)
        print(tokens, "layer", {w: round(r["median_ms"], 2) for w, r in record["layer"][str(tokens)].items()},
              flush=True)
    write_record(record, a.out, plot_record)


if __name__ == "__main__":
    main()
