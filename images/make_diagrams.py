"""Draw the course's diagrams from the code, so they stay true to it.

    python images/make_diagrams.py [--out images/]       (after `make install`: lessons_lib is installed)

moe_layer.png: the parts of `MoELayer` (router, dispatcher, expert bank) and what flows
between them, with the registered dispatchers and expert banks named.
ep_token_flow.png: a real routing of 8 tokens by a seeded 8-expert top-2 layer, and the
rank each (token, expert) pair must travel to when 2 ranks share the experts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from lessons_lib import DISPATCHERS, EXPERT_BANKS, ROUTERS, MoEConfig, MoELayer, experts_of_rank  # noqa: E402

RANK_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]


def _box(ax, x, y, w, h, text, colour="#EEEEEE", fontsize=10):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="#333333"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, x0, y0, x1, y1, colour="#333333", text=None):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color=colour, lw=1.3))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.05, text, ha="center", va="bottom", fontsize=8)


def draw_layer(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 3.6)
    ax.axis("off")
    _box(ax, 0.1, 1.4, 1.1, 0.8, "x\n[T, H]")
    _box(ax, 1.8, 2.4, 1.8, 0.8, "router\n" + "\n".join(sorted(ROUTERS)), "#D6E4F0", 8)
    names = sorted(DISPATCHERS)
    listed = "\n".join(", ".join(names[i:i + 2]) for i in range(0, len(names), 2))
    _box(ax, 1.8, 0.5, 1.8, 1.5, "dispatcher\n.dispatch\n" + listed, "#FBE3D3", 9)
    _box(ax, 4.9, 0.5, 2.6, 1.5, "expert bank\nE FFNs, stacked\nw1 (w13), w2\n" + ", ".join(sorted(EXPERT_BANKS)),
         "#DCEFD9", 9)
    _box(ax, 8.8, 0.5, 1.8, 1.5, "dispatcher\n.combine\nΣ weight · expert(x)", "#FBE3D3", 9)
    _box(ax, 10.9, 1.4, 1.0, 0.8, "y\n[T, H]")
    _arrow(ax, 1.2, 1.9, 1.8, 2.7)
    _arrow(ax, 1.2, 1.7, 1.8, 1.25)
    _arrow(ax, 2.7, 2.4, 2.7, 2.0, text="ids, weights")
    _arrow(ax, 3.6, 1.25, 4.9, 1.25, text="rows grouped\nby expert\n(capacity)")
    _arrow(ax, 7.5, 1.25, 8.8, 1.25, text="expert\noutputs")
    _arrow(ax, 10.6, 1.25, 10.9, 1.7)
    ax.text(6, 3.3, "MoELayer(cfg, dispatcher=..., experts=...): the lessons swap one part at a time",
            ha="center", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_token_flow(path: Path, world_size: int = 2) -> None:
    cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, seed=3)
    layer = MoELayer(cfg)
    tokens_per_rank = 4
    x = torch.randn(world_size * tokens_per_rank, cfg.hidden_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids = layer.router(x).expert_ids
    owner = {e: r for r in range(world_size) for e in experts_of_rank(cfg.num_experts, r, world_size)}
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.axis("off")
    T = len(x)
    ax.set_xlim(-0.2, 8.8)
    ax.set_ylim(-0.6, T - 0.4)
    tok_y = {t: T - 1 - t for t in range(T)}
    exp_y = {e: (cfg.num_experts - 1 - e) * (T - 1) / (cfg.num_experts - 1) for e in range(cfg.num_experts)}
    moved = 0
    for t in range(T):
        src = t // tokens_per_rank
        _box(ax, 0, tok_y[t] - 0.3, 1.6, 0.6, f"rank {src} · token {t % tokens_per_rank}", RANK_COLOURS[src] + "55", 8)
        for e in ids[t].tolist():
            remote = owner[e] != src
            moved += remote
            _arrow(ax, 1.65, tok_y[t], 6.35, exp_y[e], RANK_COLOURS[src] if remote else "#999999")
    for e in range(cfg.num_experts):
        _box(ax, 6.4, exp_y[e] - 0.3, 2.2, 0.6, f"expert {e} (on rank {owner[e]})", RANK_COLOURS[owner[e]] + "55", 8)
    ax.set_title(f"{T} tokens on {world_size} ranks, top-{cfg.top_k} of {cfg.num_experts} experts: "
                 f"{moved} of {T * cfg.top_k} (token, expert) pairs cross to another rank (coloured)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "moe_layer.png", out / "ep_token_flow.png"]
    draw_layer(paths[0])
    draw_token_flow(paths[1])
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
