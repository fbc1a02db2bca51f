"""Proof that an expert-parallel layer computes what the single-device layer computes (lesson 02).

Both layers load the same unsharded weights. The single-device layer runs the whole global
batch; the EP layer runs it spread over the ranks, each rank its own slice of tokens. Then
we compare, on every rank: the outputs, the gradient of the input, of the router weight (summed
over ranks, since each rank's router copy only sees its own tokens) and of every expert weight
(each rank holds its experts' slice). The worst relative error of any rank is returned.

Adversarial routings are made by steering the router: every token carries a constant feature
x[:, 0] = 1 (and rank 0's tokens a marker x[:, 1] = 1), and large weights on those features
force the choices below while everything else stays random. The hash router (lesson 06) has no
weight to steer: its token ids are picked instead, among ids whose hashed experts make the case.
The replicated weights (router, shared expert) are compared with their gradients summed over ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..model.generate import generate
from ..model.transformer import ModelConfig, MoETransformer
from ..moe.config import ROUTES_BY_ID, MoEConfig
from ..moe.distributed import experts_of_rank, rank_and_size
from ..moe.init import expert_hash, hashed_table, init_full_state_dict
from ..moe.layer import MoELayer

ROUTINGS = {
    "random": "the router's own random choices",
    "one_expert": "every token's first choice is the last expert",
    "own_experts": "rank 0's tokens go to rank 0's experts only",
    "receives_nothing": "no token goes to the last rank's experts",
    "remote_node": "rank 0's tokens go to the last node's experts only (lesson 10)",
    "one_node": "every token goes to the first node's experts only (lesson 10)",
}
STEER = 30.0  # a logit offset that decides top-k outright (e^-30 ≈ 1e-13)


def adversarial_inputs(cfg: MoEConfig, tokens_per_rank: list[int], routing: str, world_size: int, seed: int = 0,
                       ranks_per_node: int | None = None):
    """(unsharded weights, global input X, output-gradient G) for one equality case. ranks_per_node: the nodes
    of the node routings (None: one node)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {sorted(ROUTINGS)}, got {routing!r}")
    g = torch.Generator().manual_seed(seed)
    total, H = sum(tokens_per_rank), cfg.hidden_dim
    X = torch.randn(total, H, generator=g)
    G = torch.randn(total, H, generator=g)
    X[:, 0] = 1.0
    X[:, 1] = 0.0
    X[: tokens_per_rank[0], 1] = 1.0  # rank 0's tokens carry the marker
    sd = {k: v if k == "router.tid2eid" else v.float() for k, v in init_full_state_dict(cfg).items()}
    dtype = cfg.torch_dtype
    if cfg.router in ROUTES_BY_ID:  # the ids choose (adversarial_token_ids); a table router's gate only weighs
        return {k: v if k == "router.tid2eid" else v.to(dtype) for k, v in sd.items()}, X.to(dtype), G.to(dtype)
    W = sd["router.weight"]
    W[:, :2] = 0.0  # only the steering below acts through the two special features
    if routing == "one_expert":
        W[cfg.num_experts - 1, 0] = STEER
    elif routing == "own_experts":
        W[list(experts_of_rank(cfg.num_experts, 0, world_size)), 1] = STEER
    elif routing == "receives_nothing":
        last = experts_of_rank(cfg.num_experts, world_size - 1, world_size)
        if world_size < 2 or cfg.top_k > cfg.num_experts - len(last):
            raise ValueError("'receives_nothing' needs 2+ ranks and top_k <= the experts of the other ranks")
        W[list(last), 0] = -STEER
    elif routing in ("remote_node", "one_node"):
        nodes = world_size // (ranks_per_node or world_size)
        per_node = cfg.num_experts // nodes
        if cfg.top_k > per_node:
            raise ValueError(f"{routing!r} needs top_k <= the experts of one node ({per_node})")
        if routing == "remote_node":
            W[cfg.num_experts - per_node:, 1] = STEER
        else:
            W[:per_node, 0] = STEER
    return {k: v.to(dtype) for k, v in sd.items()}, X.to(dtype), G.to(dtype)


def adversarial_token_ids(cfg: MoEConfig, tokens_per_rank: list[int], routing: str, world_size: int,
                          seed: int = 0) -> torch.Tensor:
    """[global T] token ids for the hash router (lesson 06) that make `routing`'s case: ids drawn from those
    whose k hashed experts satisfy it ("one_expert": every token the same id, so the same k experts)."""
    total = sum(tokens_per_rank)
    g = torch.Generator().manual_seed(seed + 1)
    candidates = torch.arange(min(50_000, cfg.vocab_size or 50_000))
    if cfg.router == "table":  # the layer's table as init_full_state_dict draws it
        experts_Vk = hashed_table(cfg)[candidates]
    else:
        experts_Vk = expert_hash(candidates, cfg.num_experts, cfg.seed).topk(cfg.top_k).indices
    def draw(ok, n):
        pool = candidates[ok]
        if len(pool) == 0:
            raise ValueError(f"no token id makes the routing {routing!r} for this config")
        return pool[torch.randint(len(pool), (n,), generator=g)]
    everything = torch.ones(len(candidates), dtype=torch.bool)
    if routing == "one_expert":
        return torch.full((total,), int(draw(everything, 1)))
    if routing == "own_experts":
        mine = experts_of_rank(cfg.num_experts, 0, world_size)
        own = ((experts_Vk >= mine.start) & (experts_Vk < mine.stop)).all(1)
        return torch.cat([draw(own, tokens_per_rank[0]), draw(everything, total - tokens_per_rank[0])])
    if routing == "receives_nothing":
        last = experts_of_rank(cfg.num_experts, world_size - 1, world_size)
        return draw((experts_Vk < last.start).all(1), total)
    return draw(everything, total)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, and inf where either holds a NaN or an inf: a NaN compares False with
    every tolerance, so `error > tol` would let a NaN result pass a check."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {list(a.shape)} and {list(b.shape)}")
    if b.numel() == 0:
        return 0.0
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def _reference_output(reference: MoELayer, X: torch.Tensor, tokens_per_rank: list[int],
                      ids: torch.Tensor | None = None) -> torch.Tensor:
    """The single-device layer's output for the global batch X (token ids `ids`, for the hash router). With a
    capacity (lesson 05) each rank's slice is run on its own: capacity is a budget per expert for one rank's tokens."""
    if reference.cfg.capacity_factor is None:
        return reference(X, ids)[0]
    id_parts = ids.split(tokens_per_rank) if ids is not None else [None] * len(tokens_per_rank)
    return torch.cat([reference(part, i)[0] for part, i in zip(X.split(tokens_per_rank), id_parts)])


def _token_ids(cfg, tokens_per_rank, routing, N, seed, device):
    if cfg.router not in ROUTES_BY_ID:
        return None
    return adversarial_token_ids(cfg, tokens_per_rank, routing, N, seed).to(device)


def _slice(ids, lo, hi):
    return ids[lo:hi] if ids is not None else None


def compare_with_single_device(cfg: MoEConfig, dispatcher: str, experts: str = "loop",
                               tokens_per_rank: list[int] | None = None, routing: str = "random",
                               group=None, seed: int = 0, device=None, overlap: bool = True,
                               ranks_per_node: int | None = None, placement=None) -> dict[str, float]:
    """Worst relative error, over the ranks of `group`, of the EP layer against the single-device
    layer: {"output": …, "grad_input": …, "grad_router.weight": …, "grad_experts.w2": …, …}.

    Every rank of `group` must call it with the same arguments (it runs collectives). Under
    tensor parallelism ("tp") every rank runs the whole global batch instead of a slice.
    """
    rank, N = rank_and_size(group)
    tokens_per_rank = list(tokens_per_rank) if tokens_per_rank is not None else [8] * N
    if len(tokens_per_rank) != N:
        raise ValueError(f"tokens_per_rank needs one entry per rank ({N}), got {tokens_per_rank}")
    device = device if device is not None else torch.device("cpu")
    sd, X, G = adversarial_inputs(cfg, tokens_per_rank, routing, N, seed, ranks_per_node)
    sd, X, G = {k: v.to(device) for k, v in sd.items()}, X.to(device), G.to(device)
    ids = _token_ids(cfg, tokens_per_rank, routing, N, seed, device)

    layer = MoELayer(cfg, dispatcher, experts, group=group, overlap=overlap, ranks_per_node=ranks_per_node,
                     placement=placement).to(device)
    layer.load_full_state_dict(sd)
    replicated = layer.dispatcher.replicated_tokens

    # a bank that rounds on purpose (lesson 13's FP8) is compared with itself on one device, else with the loop
    reference = MoELayer(cfg, "local", "loop" if layer.experts.same_function_as_loop else experts).to(device)
    reference.load_full_state_dict(sd)
    x_ref = X.clone().requires_grad_()
    y_ref = _reference_output(reference, x_ref, [len(X)] if replicated else tokens_per_rank, ids)
    (y_ref.float() * G.float()).sum().backward()

    lo = 0 if replicated else sum(tokens_per_rank[:rank])  # TP: every rank runs the whole batch
    hi = len(X) if replicated else lo + tokens_per_rank[rank]
    x = X[lo:hi].clone().requires_grad_()
    y, _ = layer(x, _slice(ids, lo, hi))
    (y.float() * G[lo:hi].float()).sum().backward()

    errors = {"output": relative_error(y, y_ref[lo:hi]), "grad_input": relative_error(x.grad, x_ref.grad[lo:hi])}
    reference_params = dict(reference.named_parameters())
    for name, p in layer.named_parameters():  # the router and the shared expert: every rank holds them whole
        if name.startswith("experts."):
            continue
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if not replicated:
            dist.all_reduce(grad, group=group)  # each rank's copy saw only its own tokens
        errors[f"grad_{name}"] = relative_error(grad, reference_params[name].grad)
    e = layer.experts.experts
    for name, p in layer.experts.named_parameters():  # this rank's part: its experts, or its slice of each
        if layer.replicas is not None:  # lesson 11: each logical expert's gradient is the sum over its replicas
            errors[f"grad_experts.{name}"] = relative_error(layer.replicas.logical(p.grad, group),
                                                            getattr(reference.experts, name).grad)
            continue
        ref = layer.experts.shard(name, getattr(reference.experts, name).grad[e.start:e.stop])
        errors[f"grad_experts.{name}"] = relative_error(p.grad, ref)
    worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(errors, worst.tolist()))


def compare_ep_dp_step(cfg: MoEConfig, ep_size: int, tokens_per_rank: int = 8, lr: float = 0.5,
                       dispatcher: str = "alltoall", experts: str = "loop", seed: int = 0, device=None) -> dict:
    """One SGD step of EP × DP on all ranks against one step of the single-device layer on the
    whole global batch: the worst relative error of the updated weights, over all ranks.

    Loss: Σ y·G / (number of global tokens), so summed gradients equal the full-batch gradient.
    SGD keeps the check exact; an element-wise optimizer (AdamW) given equal gradients makes equal
    updates too, but would amplify rounding noise in gradients that are ~0.
    """
    from ..moe.process_groups import build_ep_dp_groups, sync_gradients

    device = device if device is not None else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = build_ep_dp_groups(ep_size)
    sd, X, G = adversarial_inputs(cfg, [tokens_per_rank] * world, "random", ep_size, seed)
    sd, X, G = {k: v.to(device) for k, v in sd.items()}, X.to(device), G.to(device)
    ids = _token_ids(cfg, [tokens_per_rank] * world, "random", ep_size, seed, device)
    total = len(X)

    reference = MoELayer(cfg, "local", "loop").to(device)
    reference.load_full_state_dict(sd)
    y_ref = _reference_output(reference, X, [tokens_per_rank] * world, ids)
    ((y_ref.float() * G.float()).sum() / total).backward()
    torch.optim.SGD(reference.parameters(), lr=lr).step()

    layer = MoELayer(cfg, dispatcher, experts, group=groups.ep_group).to(device)
    layer.load_full_state_dict(sd)
    lo, hi = rank * tokens_per_rank, (rank + 1) * tokens_per_rank
    y, _ = layer(X[lo:hi], _slice(ids, lo, hi))
    ((y.float() * G[lo:hi].float()).sum() / total).backward()
    sync_gradients(layer, groups)
    torch.optim.SGD(layer.parameters(), lr=lr).step()

    e = layer.experts.experts
    reference_params = dict(reference.named_parameters())
    errors = {name: relative_error(p.detach(), reference_params[name].detach())
              for name, p in layer.named_parameters() if not name.startswith("experts.")}
    for name, p in layer.experts.named_parameters():
        ref = getattr(reference.experts, name).detach()[e.start:e.stop]
        errors[f"experts.{name}"] = relative_error(p.detach(), ref)
    # the step must have changed the weights, or equality would prove nothing
    moved = (reference.experts.w2.detach() - sd["experts.w2"]).abs().max().item()
    worst = torch.tensor(list(errors.values()) + [-moved], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    out = dict(zip(errors, worst[:-1].tolist()))
    out["weights_moved"] = -worst[-1].item()
    return out


def routing_cases(world_size: int) -> list[tuple[str, list[int], str]]:
    """The (name, tokens per rank, routing) cases lessons 02 and 03 check every dispatcher on."""
    even = [8] * world_size
    cases = [("random", even, "random"), ("one_expert", even, "one_expert"), ("own_experts", even, "own_experts"),
             ("uneven tokens", [5 + 7 * r for r in range(world_size)], "random"),
             ("a rank with no tokens", [0] + [8] * (world_size - 1), "random")]
    if world_size > 1:
        cases.append(("receives_nothing", even, "receives_nothing"))
    return cases


def check_routings(cfg: MoEConfig, dispatcher: str, experts: str = "loop", group=None, device=None) -> list[dict]:
    """`compare_with_single_device` on every case of `routing_cases`: one row of errors per case."""
    _, N = rank_and_size(group)
    return [{"case": name, **compare_with_single_device(cfg, dispatcher, experts, tokens, routing, group,
                                                        device=device)}
            for name, tokens, routing in routing_cases(N)]


def compare_placement_training(cfg: MoEConfig, first, second, steps: int = 20, tokens: int = 12, group=None,
                               device=None, dispatcher: str = "alltoall", ranks_per_node: int | None = None) -> dict:
    """Lesson 11: the same SGD run (with momentum, so the optimizer has state to move) of a layer without a
    placement and with placement `first`, moved to `second` halfway (`set_placement`), both behind `dispatcher`
    ("hierarchical": on nodes of ranks_per_node). -> the worst relative difference of any slot's weights from its
    expert's weights in the run without, and the largest difference of any step's loss. Every rank of `group`
    calls it together."""
    from ..moe.distributed import all_reduce_grads

    rank, N = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    sd = init_full_state_dict(cfg)
    kw = {"group": group, "ranks_per_node": ranks_per_node}
    layers = {"plain": MoELayer(cfg, dispatcher, "grouped", **kw),
              "placed": MoELayer(cfg, dispatcher, "grouped", **kw, placement=first)}
    opts = {}
    for name, layer in layers.items():
        layer.to(device).load_full_state_dict(sd)
        opts[name] = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    losses = {name: [] for name in layers}
    for step in range(steps):
        x, target = (torch.randn(tokens, cfg.hidden_dim, generator=g).to(device) for _ in range(2))
        if step == steps // 2:
            layers["placed"].set_placement(second, opts["placed"])
        for name, layer in layers.items():
            y, _ = layer(x)
            loss = ((y - target) ** 2).mean()
            opts[name].zero_grad()
            loss.backward()
            all_reduce_grads(layer.replicated_parameters(), group)  # the router: every rank holds it whole
            if layer.replicas is not None:
                layer.sum_replica_grads()
            opts[name].step()
            losses[name].append(loss.item())
    plain, placed = layers["plain"], layers["placed"]
    worst = 0.0
    for name, p in placed.experts.named_parameters():
        mine = getattr(plain.experts, name).detach()
        every = [torch.empty_like(mine) for _ in range(N)]
        dist.all_gather(every, mine, group=group)
        logical = torch.cat(every)[placed.replicas.mine.to(device)]  # what each of this rank's slots should hold
        worst = max(worst, ((p.detach() - logical).abs().max() / logical.abs().max()).item())
    result = torch.tensor([worst, max(abs(a - b) for a, b in zip(losses["plain"], losses["placed"]))],
                          dtype=torch.float64, device=device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return {"worst_weight": result[0].item(), "loss_diff": result[1].item(), "moved": not torch.equal(
        torch.as_tensor(first), torch.as_tensor(second)), "steps": steps}


def rank_prompts(cfg: ModelConfig, rank: int, seed: int = 0) -> torch.Tensor:
    """Rank r's prompts for `compare_generation`: 1 + r % 3 sequences of 3 + 2r tokens (every rank differs)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randint(0, cfg.vocab_size, (1 + rank % 3, 3 + 2 * rank), generator=g)


def compare_generation(cfg: ModelConfig, dispatcher: str, experts: str = "grouped", new_tokens: int = 32,
                       group=None, device=None, seed: int = 0) -> dict:
    """Lesson 14: greedy generation with the MoE layers spread over `group` (each rank its own prompts,
    `rank_prompts`) against the same model on one device generating from the same prompts.

    -> {"same_ids": every generated token equal on every rank, "logits": the worst relative error of the logits
    over the ranks, "sequences": how many sequences all ranks generated}. Every rank calls it together."""
    rank, _ = rank_and_size(group)
    device = device if device is not None else torch.device("cpu")
    prompt = rank_prompts(cfg, rank, seed).to(device)
    ids, logits = generate(MoETransformer(cfg, dispatcher, experts, group).to(device), prompt, new_tokens)
    ids_ref, logits_ref = generate(MoETransformer(cfg, "local", "loop").to(device), prompt, new_tokens)
    worst = torch.tensor([float(not torch.equal(ids, ids_ref)), relative_error(logits, logits_ref)],
                         dtype=torch.float64, device=device)
    sequences = torch.tensor([float(len(ids))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(sequences, group=group)
    return {"same_ids": worst[0].item() == 0.0, "logits": worst[1].item(), "sequences": int(sequences.item())}


def main(argv=None):
    """The proof of one dispatcher on the ranks and device torchrun gives (a GPU record: lesson 10's on one H200):

        torchrun --standalone --nproc-per-node N -m lessons_lib.lab.equivalence --dispatcher hierarchical \\
            --ranks-per-node R --out images/hierarchical_1xh200.json
    """
    import argparse
    import json

    from .records import record_header

    p = argparse.ArgumentParser(description="EP against the single-device layer, on the ranks torchrun gives")
    p.add_argument("--dispatcher", default="hierarchical")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, N = rank_and_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    R = a.ranks_per_node if a.dispatcher == "hierarchical" else None
    nodes = N // (R or N)
    base = dict(num_experts=2 * N, top_k=2, hidden_dim=64, ffn_dim=32)
    configs = {"gelu": MoEConfig(**base),
               "swiglu, node-limited M=1": MoEConfig(**base, activation="swiglu", router="sigmoid_bias",
                                                     num_groups=nodes, topk_groups=1)}
    cases = routing_cases(N) + ([("remote_node", [8] * N, "remote_node"), ("one_node", [8] * N, "one_node")]
                                if a.dispatcher == "hierarchical" else [])
    record = record_header("lessons_lib.lab.equivalence", device, argv)
    errors = {}
    for name, cfg in configs.items():
        for case, tokens, routing in cases:
            for bank in ("loop", "grouped"):
                e = compare_with_single_device(cfg, a.dispatcher, bank, tokens, routing, device=device,
                                               ranks_per_node=R)
                errors[f"{name} / {case} / {bank}"] = max(e.values())
    record["worst_relative_error_fp32"] = errors
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"worst of {len(errors)} cases: {max(errors.values()):.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
