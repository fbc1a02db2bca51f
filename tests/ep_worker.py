"""Runs on every rank under torchrun (tests/test_ep.py launches it with launcher.run_script).

Modes (params["mode"]):
  equality: every dispatcher × activation × routing case against the single-device layer;
  bad_input: one rank gets bad input, or E is not divisible by N: every rank must raise, none hang;
  alltoall_autograd: our AllToAll Function against PyTorch's differentiable all_to_all_single;
  traffic: the bytes each dispatcher counts against what the routing says it must send;
  bias: DeepSeek-V3's bias update sums the loads over the ranks, so every rank keeps the same bias;
  shared_block: lesson 08's shared experts (gated or not) and lesson 06's hash router behind every dispatcher and bank;
  overlap_bitwise: the shared expert overlapped with the dispatch computes bit for bit what it computes without;
  fp8_dispatch: lesson 12's FP8 dispatch behind every dispatcher that sends rows, against the single-device layer with
    the same quantization, and its counted bytes; fp4_bank: lesson 13's FP4 bank against itself on one device;
  generation: lesson 14's generation of the MoE transformer with its MoE layers over the ranks against one device; a
    bad generate() argument on one rank;
  two_batch, static: lesson 09's two micro-batches and lesson 15's static decode path against the layer whole;
  placement, placement_training: lesson 11's replicas behind the all-to-all; placement_hierarchical: behind lesson
    10's dispatcher (equality, 20 steps across a re-placement, nodes a token reaches under node-limited routing).
"""
import os

import torch
import torch.distributed as dist

from launcher import runtime
from lessons_lib import MoEConfig, MoELayer
from lessons_lib.lab.equivalence import compare_with_single_device
from lessons_lib.moe.dispatch_alltoall import AllToAll
from lessons_lib.moe.experts_batched import GroupedExperts


def equality_cases(N):
    """(dispatcher, expert bank, config, case name, tokens per rank, routing)."""
    base = dict(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32)
    for activation in ("gelu", "swiglu"):  # lesson 07's tensor-parallel split of every expert
        for bank in ("loop", "grouped"):
            cfg = MoEConfig(**base, activation=activation)
            yield "tp", bank, cfg, "random", [8] * N, "random"
            yield "tp", bank, cfg, "one_expert", [8] * N, "one_expert"
            yield "tp", bank, MoEConfig(**{**base, "top_k": 8}, activation=activation), "top_k=E", [5] * N, "random"
    for dispatcher in ("allgather", "alltoall"):
        for bank in ("bmm", "grouped"):  # lesson 04's banks behind both dispatchers
            cfg = MoEConfig(**base, activation="swiglu")
            yield dispatcher, bank, cfg, "random", [8] * N, "random"
            yield dispatcher, bank, cfg, "one_expert", [8] * N, "one_expert"
            yield dispatcher, bank, cfg, "a rank with zero tokens", [0, 6, 0, 9][:N], "random"
            yield dispatcher, bank, cfg, "uneven tokens", [8, 3, 12, 5][:N], "random"
            yield dispatcher, bank, MoEConfig(**{**base, "top_k": 8}, activation="swiglu"), "top_k=E", [5] * N, "random"
            if N > 1:  # empty groups on every rank but one
                yield dispatcher, bank, cfg, "receives_nothing", [8] * N, "receives_nothing"
    for dispatcher in ("allgather", "alltoall"):
        for activation in ("gelu", "swiglu"):
            cfg = MoEConfig(**base, activation=activation)
            even = [8] * N
            yield dispatcher, "loop", cfg, "random", even, "random"
            yield dispatcher, "loop", cfg, "one_expert", even, "one_expert"
            yield dispatcher, "loop", cfg, "own_experts", even, "own_experts"
            if N > 1:
                yield dispatcher, "loop", cfg, "receives_nothing", even, "receives_nothing"
            top_k_is_e = MoEConfig(**{**base, "top_k": 8}, activation=activation)
            yield dispatcher, "loop", top_k_is_e, "top_k=E", even, "random"
            e_is_n = MoEConfig(**{**base, "num_experts": N, "top_k": min(2, N)}, activation=activation)
            yield dispatcher, "loop", e_is_n, "E=N", even, "random"
            yield dispatcher, "loop", cfg, "uneven tokens", [8, 3, 12, 5][:N], "random"
            yield dispatcher, "loop", cfg, "a rank with zero tokens", [0, 6, 0, 9][:N], "random"
    for dispatcher in ("allgather", "alltoall", "tp"):  # lesson 05: capacity, drops decided per rank
        for policy, pad, bank in (("probs", False, "loop"), ("position", False, "grouped"), ("probs", True, "bmm")):
            cfg = MoEConfig(**base, activation="swiglu", capacity_factor=0.75, drop_policy=policy, pad_to_capacity=pad)
            name = f"capacity 0.75, {policy}{', padded' if pad else ''}"
            yield dispatcher, bank, cfg, f"{name}: random", [8] * N, "random"
            yield dispatcher, bank, cfg, f"{name}: one_expert", [8] * N, "one_expert"
            if dispatcher != "tp":
                yield dispatcher, bank, cfg, f"{name}: uneven tokens", [8, 3, 12, 0][:N], "random"
    deepseek = MoEConfig(**base, activation="swiglu", router="sigmoid_bias", num_groups=4, topk_groups=2,
                         routed_scaling_factor=2.5)
    for dispatcher in ("allgather", "alltoall", "tp"):  # lesson 06's router
        yield dispatcher, "grouped", deepseek, "sigmoid_bias, 2 of 4 groups", [8] * N, "random"


def looped_grouped_cases(N):
    """The grouped bank where no grouped GEMM kernel exists (a CPU, fp32): `LoopedGroupedMM`, including
    experts that get no rows (their weight gradient must be zero) and a rank with no tokens at all."""
    base = dict(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32)
    for dispatcher in ("allgather", "alltoall"):
        for activation in ("gelu", "swiglu"):
            cfg = MoEConfig(**base, activation=activation)
            yield dispatcher, "grouped", cfg, "loop of mm: random", [8] * N, "random"
            yield dispatcher, "grouped", cfg, "loop of mm: one_expert", [8] * N, "one_expert"
            yield dispatcher, "grouped", cfg, "loop of mm: uneven tokens", [0, 6, 12, 5][:N], "random"


def shared_block_cases(N):
    """(dispatcher, bank, config, case, tokens per rank, routing) for lesson 08's block."""
    from lessons_lib.lab.equivalence import routing_cases

    base = dict(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32)
    configs = {"shared, gelu": MoEConfig(**base, shared_ffn_dim=24),
               "shared gated, swiglu": MoEConfig(**base, activation="swiglu", shared_ffn_dim=24, shared_gate=True),
               "hash": MoEConfig(**base, activation="swiglu", router="hash"),
               "hash, shared gated": MoEConfig(**base, router="hash", shared_ffn_dim=8, shared_gate=True),
               "table, shared": MoEConfig(**base, activation="swiglu", router="table", vocab_size=5000,
                                          routed_scaling_factor=1.5, shared_ffn_dim=8),
               "deepseek: sigmoid_bias + shared": MoEConfig(**base, activation="swiglu", router="sigmoid_bias",
                                                            num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                                                            shared_ffn_dim=32)}
    for dispatcher in ("allgather", "alltoall", "tp"):
        for bank in ("loop", "grouped"):
            for name, cfg in configs.items():
                for case, tokens, routing in routing_cases(N):
                    yield dispatcher, bank, cfg, f"{name}: {case}", tokens, routing
                every_group = {"topk_groups": None, "num_groups": 1} if cfg.topk_groups else {}
                top_k_is_e = MoEConfig(**{**cfg.__dict__, "top_k": 8, **every_group})
                yield dispatcher, bank, top_k_is_e, f"{name}: top_k=E", [5] * N, "random"


def fp8_dispatch_cases(N):
    """(dispatcher, bank, config, case, tokens per rank, routing, ranks_per_node) for lesson 12's FP8 dispatch."""
    from lessons_lib.lab.equivalence import routing_cases

    fp8 = dict(num_experts=4 * N, top_k=2, hidden_dim=128, ffn_dim=32, dispatch_dtype="float8_e4m3fn")
    configs = {"fp8, gelu": MoEConfig(**fp8),
               "fp8, swiglu + shared": MoEConfig(**fp8, activation="swiglu", shared_ffn_dim=16),
               "fp8, deepseek": MoEConfig(**fp8, activation="swiglu", router="sigmoid_bias", num_groups=2,
                                          topk_groups=1, routed_scaling_factor=2.5)}
    R = 2 if N % 2 == 0 and N > 2 else 1  # hierarchical: 2 × 2 on 4 ranks, N nodes of one rank otherwise
    node_cases = [("k experts on one remote node", [8] * N, "remote_node"), ("every token to one node", [8] * N,
                                                                              "one_node")]
    for dispatcher in ("allgather", "alltoall", "hierarchical"):
        for bank in ("loop", "grouped"):
            for name, cfg in configs.items():
                cases = routing_cases(N) + (node_cases if dispatcher == "hierarchical" else [])
                for case, tokens, routing in cases:
                    yield dispatcher, bank, cfg, f"{name}: {case}", tokens, routing, R
            yield dispatcher, bank, MoEConfig(**{**fp8, "top_k": 4 * N}), "fp8: top_k=E", [5] * N, "random", R
        for name in ("fp8, gelu", "fp8, swiglu + shared"):  # the FP8 bank, against itself on one device
            for case, tokens, routing in routing_cases(N):
                yield dispatcher, "fp8", configs[name], f"{name}, fp8 bank: {case}", tokens, routing, R
            plain = MoEConfig(**{**configs[name].__dict__, "dispatch_dtype": None})
            yield dispatcher, "fp8", plain, f"{name[5:]}, fp8 bank, bf16 wire", [6] * N, "random", R


def hierarchical_cases(N, R):
    """(bank, config, case, tokens per rank, routing) for lesson 10's dispatcher on N ranks as N/R nodes × R."""
    from lessons_lib.lab.equivalence import routing_cases

    nodes = N // R
    E = 2 * N
    base = dict(num_experts=E, top_k=2, hidden_dim=16, ffn_dim=32)
    configs = {"gelu": MoEConfig(**base),
               "swiglu, shared": MoEConfig(**base, activation="swiglu", shared_ffn_dim=8),
               "node-limited M=1": MoEConfig(**base, activation="swiglu", router="sigmoid_bias", num_groups=nodes,
                                             topk_groups=1)}
    cases = routing_cases(N) + [("k experts on one remote node", [8] * N, "remote_node"),
                                ("every token to one node", [8] * N, "one_node")]
    for bank in ("loop", "grouped"):
        for name, cfg in configs.items():
            for case, tokens, routing in cases:
                yield bank, cfg, f"{name}: {case}", tokens, routing
    yield "grouped", MoEConfig(**{**base, "top_k": E}), "top_k=E", [5] * N, "random"
    yield "loop", MoEConfig(**base, router="hash", shared_ffn_dim=8), "hash", [6] * N, "random"


def placement_cases(N):
    """(bank, config, case, placement, tokens per rank, routing) for lesson 11's replicas on N ranks."""
    from lessons_lib.moe.placement import place_experts

    E = 2 * N
    gelu = MoEConfig(num_experts=E, top_k=2, hidden_dim=16, ffn_dim=32)
    swiglu = MoEConfig(num_experts=E, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu", shared_ffn_dim=8)
    contiguous = torch.arange(E).view(N, -1)
    # the last expert (lesson 02's "one_expert" routing sends every token there) on every rank; the last rank,
    # which has it already, gets another copy of expert 0
    hot = torch.cat([contiguous, torch.full((N, 1), E - 1)], dim=1)
    hot[-1, -1] = 0
    skewed = place_experts(torch.tensor([100.0, 60.0] + [1.0] * (E - 2)), N, 3)  # 2-3 replicas for two experts
    if N > 1:  # the last rank holds nothing but copies of experts the other ranks hold too
        only_copies = torch.cat([torch.arange(E - 2).view(N - 1, 2), torch.tensor([[0, 1]])])
        only_copies_E = E - 2
    cases = [("no replica", contiguous, [8] * N, "random"), ("hot expert on every rank", hot, [8] * N, "random"),
             ("every token to the replicated expert", hot, [8] * N, "one_expert"),
             ("several experts with 2-3 replicas", skewed, [5 + 3 * r for r in range(N)], "random"),
             ("a rank with no tokens", skewed, [0] + [8] * (N - 1), "random")]
    for bank in ("loop", "grouped"):
        for cfg in (gelu, swiglu):
            for case, placement, tokens, routing in cases:
                yield bank, cfg, f"{cfg.activation}: {case}", placement, tokens, routing
            if N > 1:
                yield (bank, MoEConfig(**{**cfg.__dict__, "num_experts": only_copies_E}),
                       f"{cfg.activation}: a rank with only copies", only_copies, [8] * N, "random")


def hierarchical_placements(N, R, E):
    """Lesson 11 behind lesson 10's dispatcher, on N ranks as N/R nodes × R: {name: placement} with 3 slots a rank
    for E experts, hot experts on the first and the last node."""
    from lessons_lib.moe.placement import place_experts

    load = torch.tensor([100.0, 60.0] + [1.0] * (E - 3) + [80.0])
    nodes = N // R
    return {"node-aware": place_experts(load, N, 3, ranks_per_node=R),
            # the nodes' groups swapped round: every expert on one node, but not its contiguous block's
            "groups moved": place_experts(load, N, 3, ranks_per_node=R, group_nodes=list(range(nodes))[::-1]),
            "replicas across nodes": place_experts(load, N, 3)}


def placement_hierarchical_cases(N, R):
    """(bank, config, case, placement, tokens per rank, routing) for lesson 11's replicas behind lesson 10's
    dispatcher: every config × placement × routing with the grouped bank, and the loop bank on one routing."""
    E, nodes = 2 * N, N // R
    base = dict(num_experts=E, top_k=2, hidden_dim=16, ffn_dim=32)
    configs = {"gelu": MoEConfig(**base),
               "swiglu, shared": MoEConfig(**base, activation="swiglu", shared_ffn_dim=8),
               "node-limited M=1": MoEConfig(**base, activation="swiglu", router="sigmoid_bias", num_groups=nodes,
                                             topk_groups=1)}
    routings = [("random", [8] * N, "random"), ("every token to a replicated expert", [8] * N, "one_expert"),
                ("k experts on one remote node", [8] * N, "remote_node"),
                ("a rank with no tokens", [0] + [8] * (N - 1), "random")]
    for place_name, placement in hierarchical_placements(N, R, E).items():
        for cfg_name, cfg in configs.items():
            for case, tokens, routing in routings:
                yield "grouped", cfg, f"{cfg_name}, {place_name}: {case}", placement, tokens, routing
        yield "loop", configs["gelu"], f"gelu, {place_name}: random, loop bank", placement, [8] * N, "random"


def nodes_per_token(rank, N, R, device):
    """Node-limited routing (M=1 group a token) behind each placement: the most hop-1 rows (token, node) a token
    of any rank sends. Each group on one node keeps it at 1; replicas spread over nodes break the bound."""
    from lessons_lib.moe.init import init_full_state_dict

    nodes = N // R
    cfg = MoEConfig(num_experts=2 * N, top_k=2, hidden_dim=16, ffn_dim=32, router="sigmoid_bias",
                    num_groups=nodes, topk_groups=1)
    out = {}
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(rank)).to(device)
    for name, placement in hierarchical_placements(N, R, cfg.num_experts).items():
        layer = MoELayer(cfg, "hierarchical", "grouped", ranks_per_node=R, placement=placement).to(device)
        layer.load_full_state_dict(init_full_state_dict(cfg))
        with torch.no_grad():
            _, _, state = layer.dispatch(x, layer.route(x))
        most = torch.tensor([float(torch.bincount(state.token_U, minlength=len(x)).max())])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out[name] = most.item()
    return out


def overlap_bitwise(rank, N, device):
    """Outputs and every gradient, overlap on vs off, compared with torch.equal on every rank."""
    from lessons_lib.lab.equivalence import adversarial_inputs, adversarial_token_ids

    cfg = MoEConfig(num_experts=4 * N, top_k=2, hidden_dim=32, ffn_dim=64, activation="swiglu",
                    shared_ffn_dim=96, shared_gate=True)
    tokens = [6 + 5 * r for r in range(N)]
    sd, X, G = adversarial_inputs(cfg, tokens, "random", N)
    lo = sum(tokens[:rank])
    x0, g = X[lo:lo + tokens[rank]].to(device), G[lo:lo + tokens[rank]].to(device)
    results = {}
    for dispatcher in ("alltoall", "allgather"):
        for bank in ("loop", "grouped"):
            runs = []
            for overlap in (True, False):
                layer = MoELayer(cfg, dispatcher, bank, overlap=overlap).to(device)
                layer.load_full_state_dict(sd)
                x = x0.clone().requires_grad_()
                y, _ = layer(x)
                (y * g).sum().backward()
                runs.append([y.detach(), x.grad] + [p.grad for _, p in layer.named_parameters()])
            results[f"{dispatcher}/{bank}"] = all(torch.equal(a, b) for a, b in zip(*runs))
    hash_cfg = MoEConfig(num_experts=4 * N, top_k=2, hidden_dim=32, ffn_dim=64, router="hash", shared_ffn_dim=32)
    ids = adversarial_token_ids(hash_cfg, tokens, "random", N)[lo:lo + tokens[rank]].to(device)
    runs = []
    for overlap in (True, False):
        layer = MoELayer(hash_cfg, "alltoall", overlap=overlap).to(device)
        x = x0.clone().requires_grad_()
        y, _ = layer(x, ids)
        (y * g).sum().backward()
        runs.append([y.detach(), x.grad] + [p.grad for _, p in layer.named_parameters()])
    results["alltoall/hash"] = all(torch.equal(a, b) for a, b in zip(*runs))
    every = [None] * N
    dist.all_gather_object(every, results)
    return every


def traffic_check(rank, N, device):
    """Measured bytes vs bytes expected from the routing itself (fp32: 4 bytes, int64: 8)."""
    cfg = MoEConfig(num_experts=4 * N, top_k=2, hidden_dim=16, ffn_dim=32)
    tokens = [5 + 3 * r for r in range(N)]
    out = {}
    for name in ("allgather", "alltoall"):
        layer = MoELayer(cfg, name).to(device)
        x = torch.randn(tokens[rank], 16, generator=torch.Generator().manual_seed(rank)).to(device)
        _, aux = layer(x)
        dest = aux.routing.expert_ids.flatten() // 4  # 4 experts per rank
        leaving = int((dest != rank).sum())
        every = [None] * N
        dist.all_gather_object(every, aux.routing.expert_ids.flatten().div(4, rounding_mode="floor").tolist())
        arriving = sum(sum(1 for d in every[s] if d == rank) for s in range(N) if s != rank)
        row = 16 * 4
        if name == "allgather":
            M = 2 * max(tokens)
            expected = {"dispatch": (N - 1) * M * row, "metadata": (N - 1) * M * 4 * 8, "combine": (N - 1) * M * row,
                        "sizes": (N - 1) * 2 * 8, "useful": (leaving + arriving) * row}
        else:
            expected = {"dispatch": leaving * row, "combine": arriving * row, "counts": (N - 1) * 6 * 8,
                        "useful": (leaving + arriving) * row}
        t = layer.dispatcher.traffic
        measured = {p: v.sent for p, v in t.phases.items()} | {"useful": t.useful}
        received = {p: v.received for p, v in t.phases.items()}
        out[name] = {"measured": measured, "expected": expected, "received": received}
        if name == "alltoall":  # what arrives: the rows other ranks route here, and their results back
            out[name]["expected_received"] = {"dispatch": arriving * row, "combine": leaving * row,
                                              "counts": (N - 1) * 6 * 8}
    out["alltoall, capacity 0.5, padded"] = padded_traffic(rank, N, tokens, device)
    every = [None] * N
    dist.all_gather_object(every, out)
    return every


def padded_traffic(rank, N, tokens, device):
    """With every expert padded to C = ceil(k·T/E · 0.5), a rank sends E_local·C rows to each other
    rank, of which min(n_e, C) per expert are real (useful)."""
    import math
    cfg = MoEConfig(num_experts=4 * N, top_k=2, hidden_dim=16, ffn_dim=32, capacity_factor=0.5, pad_to_capacity=True)
    layer = MoELayer(cfg, "alltoall").to(device)
    x = torch.randn(tokens[rank], 16, generator=torch.Generator().manual_seed(rank)).to(device)
    _, aux = layer(x)
    C = [math.ceil(2 * t / (4 * N) * 0.5) for t in tokens]
    assert aux.capacity == C[rank]
    every = [None] * N
    dist.all_gather_object(every, aux.tokens_per_expert.view(N, 4).tolist())  # [dest rank][local expert]
    kept = [[sum(min(n, C[s]) for n in every[s][d]) for d in range(N)] for s in range(N)]  # s sends d
    row = 16 * 4
    others = [r for r in range(N) if r != rank]
    expected = {"counts": (N - 1) * 6 * 8, "dispatch": (N - 1) * 4 * C[rank] * row,
                "combine": sum(4 * C[s] for s in others) * row,
                "useful": sum(kept[rank][d] + kept[d][rank] for d in others) * row}
    t = layer.dispatcher.traffic
    return {"measured": {p: v.sent for p, v in t.phases.items()} | {"useful": t.useful}, "expected": expected,
            "received": {p: v.received for p, v in t.phases.items()}}


def generation_configs(N):
    from lessons_lib.model import ModelConfig
    moe = dict(num_experts=2 * N if N > 1 else 4, top_k=2, hidden_dim=32, ffn_dim=64)
    return {"softmax, swiglu, shared": ModelConfig(MoEConfig(**moe, activation="swiglu", shared_ffn_dim=32),
                                                   vocab_size=64, max_seq_len=48),
            "sigmoid_bias, groups, gelu": ModelConfig(MoEConfig(**moe, router="sigmoid_bias", num_groups=2,
                                                                topk_groups=1), vocab_size=64, max_seq_len=48),
            "hash": ModelConfig(MoEConfig(**moe, router="hash", activation="swiglu"), vocab_size=64, max_seq_len=48)}


def whole_layer_paths(rank, world_size, device, path: str):
    """Lesson 09's two micro-batches (path "two_batch") or lesson 15's static decode (path "static") against the
    layer run whole, on adversarial cases: uneven and empty ranks, one token, top_k = E, a gated shared expert, and
    lesson 06's routers by token id."""
    from lessons_lib.lab.equivalence import relative_error
    from lessons_lib.moe.capacity import static_dropless
    from lessons_lib.moe.static_decode import StaticDecode
    from lessons_lib.moe.two_batch import two_batch_forward

    GroupedExperts.use_reference_kernel = True
    base = dict(num_experts=2 * world_size, top_k=2, hidden_dim=32, ffn_dim=64, activation="swiglu")
    cases = {"random": (MoEConfig(**base), [9, 4, 13, 6]), "one token": (MoEConfig(**base), [1, 1, 1, 1]),
             "a rank with zero tokens": (MoEConfig(**base), [0, 7, 3, 0]),
             "shared, gated": (MoEConfig(**base, shared_ffn_dim=32, shared_gate=True), [8, 5, 2, 11]),
             "hash": (MoEConfig(**base, router="hash"), [8, 5, 2, 11]),
             "table": (MoEConfig(**base, router="table", vocab_size=1000, routed_scaling_factor=1.5), [3, 8, 1, 5]),
             "top_k = E": (MoEConfig(**{**base, "top_k": base["num_experts"]}), [6, 3, 5, 1])}
    out = []
    for name, (cfg, tokens) in cases.items():
        T = tokens[rank % 4]
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(T, cfg.hidden_dim, generator=g).to(device)
        ids = torch.randint(0, 1000, (T,), generator=g).to(device)
        layer = MoELayer(cfg, "alltoall", "grouped").to(device)
        with torch.no_grad():
            whole = layer(x, token_ids=ids)[0]
        if path == "two_batch":
            for overlap in (True, False):
                split = two_batch_forward(layer, x, ids, overlap=overlap)
                out.append({"case": name, "overlap": overlap, "error": relative_error(split, whole)})
        else:
            static = StaticDecode(MoELayer(static_dropless(cfg), "alltoall", "grouped").to(device), max(tokens))
            out.append({"case": name, "error": relative_error(static(x, ids), whole)})
    return out


def generation(rank, world_size, device):
    from lessons_lib.lab.equivalence import compare_generation
    from lessons_lib.model import ModelConfig, MoETransformer, generate

    GroupedExperts.use_reference_kernel = True
    out = {"generation": []}
    for name, cfg in generation_configs(world_size).items():
        for dispatcher in ("allgather", "alltoall", "hierarchical"):
            for bank in ("loop", "grouped"):
                r = compare_generation(cfg, dispatcher, bank, new_tokens=32, device=device)
                out["generation"].append({"config": name, "dispatcher": dispatcher, "experts": bank, **r})
    base = dict(num_experts=2 * world_size, top_k=2, hidden_dim=32, ffn_dim=64, activation="swiglu")
    cfg = ModelConfig(MoEConfig(**base), vocab_size=64, max_seq_len=16)
    model = MoETransformer(cfg, "alltoall", "grouped").to(device)
    # what rank 1 passes; the other ranks pass a good prompt and ask for 4 tokens
    bad = {"too long": (torch.zeros(1, 10, dtype=torch.long), 8), "id out of range": (torch.full((1, 2), 64), 4),
           "int32 prompt": (torch.zeros(1, 2, dtype=torch.int32), 4),
           "different new_tokens": (torch.zeros(1, 2, dtype=torch.long), 5)}
    out["bad_generate"] = {}
    for name, (prompt, n) in bad.items():
        try:
            good = torch.zeros(1, 2, dtype=torch.long)
            generate(model, (prompt if rank == 1 else good).to(device), n if rank == 1 else 4)
            out["bad_generate"][name] = "no error"
        except ValueError as e:
            out["bad_generate"][name] = str(e)
    ids, _ = generate(model, torch.zeros(1, 2, dtype=torch.long, device=device), 4)  # the group still works
    out["after_bad"] = ids.shape[1]
    every = [None] * world_size
    dist.all_gather_object(every, out["bad_generate"])
    out["bad_generate"] = every
    return out


def node_bytes_statuses():
    """Exercise 10.3's check on the library's answer and on wrong ones: {name: status}."""
    from lessons_lib.course.checker import run_check
    from lessons_lib.course.exercises import inter_node_bytes
    from lessons_lib.lab.node_traffic import remote_nodes

    def summed(value):
        t = torch.tensor([value])
        dist.all_reduce(t)
        return int(t.item())

    def not_reduced(ids, E, rank, R, nodes, row_bytes):  # this rank's bytes only
        return remote_nodes(ids, E, nodes, rank // R) * row_bytes

    def pairs_not_nodes(ids, E, rank, R, nodes, row_bytes):  # the flat count: every remote (token, slot)
        return summed(int((ids // (E // nodes) != rank // R).sum()) * row_bytes)

    def rank_mod_nodes(ids, E, rank, R, nodes, row_bytes):  # the node as rank % nodes: right at 2 ranks, 1 × 2 or 2 × 1
        return summed(remote_nodes(ids, E, nodes, rank % nodes) * row_bytes)

    return {f"10.3 {name}": run_check("10.3", fn)["status"] for name, fn in
            (("solution", inter_node_bytes), ("not reduced", not_reduced), ("pairs, not nodes", pairs_not_nodes),
             ("rank % nodes", rank_mod_nodes))}


def main():
    rank, world_size, device = runtime.setup()
    p = runtime.params()
    result = {}
    if p["mode"] == "equality":
        rows = []
        cases = [(True, case) for case in equality_cases(world_size)]  # check torch._grouped_mm itself, even on a CPU
        cases += [(False, case) for case in looped_grouped_cases(world_size)]  # and the loop of mm a CPU runs instead
        for reference_kernel, (dispatcher, bank, cfg, name, tokens, routing) in cases:
            GroupedExperts.use_reference_kernel = reference_kernel
            errors = compare_with_single_device(cfg, dispatcher, bank, tokens_per_rank=tokens, routing=routing,
                                                device=device)
            row = {"dispatcher": dispatcher, "experts": bank, "activation": cfg.activation, "case": name,
                   "worst": max(errors.values()), "errors": errors}
            if bank == "grouped":  # which path such a layer took here: torch._grouped_mm, or the loop of mm
                probe = MoELayer(cfg, dispatcher, bank).to(device)
                probe(torch.randn(tokens[rank], cfg.hidden_dim, device=device))
                row["path"] = probe.experts.path
            rows.append(row)
        result = rows
    elif p["mode"] == "shared_block":
        GroupedExperts.use_reference_kernel = True
        result = []
        for dispatcher, bank, cfg, name, tokens, routing in shared_block_cases(world_size):
            errors = compare_with_single_device(cfg, dispatcher, bank, tokens_per_rank=tokens, routing=routing,
                                                device=device, overlap=p.get("overlap", True))
            result.append({"dispatcher": dispatcher, "experts": bank, "case": name, "errors": errors})
    elif p["mode"] == "fp8_dispatch":
        GroupedExperts.use_reference_kernel = True
        result = {"rows": [], "bytes": {}}
        for dispatcher, bank, cfg, name, tokens, routing, R in fp8_dispatch_cases(world_size):
            errors = compare_with_single_device(cfg, dispatcher, bank, tokens_per_rank=tokens, routing=routing,
                                                device=device, ranks_per_node=R if dispatcher == "hierarchical"
                                                else None)
            result["rows"].append({"dispatcher": dispatcher, "experts": bank, "case": name, "errors": errors})
        for dtype in ("bfloat16", None):  # counted dispatch bytes: bf16 rows, then the same rows in FP8
            cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=256, ffn_dim=32, dtype="bfloat16",
                            dispatch_dtype=None if dtype else "float8_e4m3fn")
            layer = MoELayer(cfg, "alltoall").to(device)
            layer(torch.randn(16, 256, device=device, dtype=torch.bfloat16,
                              generator=torch.Generator(device).manual_seed(rank)))
            result["bytes"][dtype or "float8_e4m3fn"] = {phase: vars(b) for phase, b in
                                                         layer.dispatcher.traffic.phases.items()}
    elif p["mode"] == "fp4_bank":  # the FP4 bank, with and without FP8 dispatch, against itself on one device
        from lessons_lib.lab.equivalence import routing_cases
        result = []
        kw = dict(num_experts=4 * world_size, top_k=2, hidden_dim=128, ffn_dim=64, activation="swiglu")
        for dispatcher in ("alltoall", "hierarchical"):
            for case, tokens, routing in routing_cases(world_size)[:3]:
                for wire in (None, "float8_e4m3fn"):
                    cfg = MoEConfig(**kw, dispatch_dtype=wire)
                    errors = compare_with_single_device(cfg, dispatcher, "fp4", tokens_per_rank=tokens,
                                                        routing=routing, device=device,
                                                        ranks_per_node=1 if dispatcher == "hierarchical" else None)
                    result.append({"dispatcher": dispatcher, "case": f"{case}, wire {wire}", "errors": errors})
    elif p["mode"] == "generation":
        result = generation(rank, world_size, device)
    elif p["mode"] == "overlap_saving":  # lesson 09, quickly: an exchange longer than the forward it hides
        from lessons_lib.lab.emulated_link import EmulatedLink
        from lessons_lib.lab.overlap_saving import overlap_saving

        cfg = MoEConfig(num_experts=4, top_k=2, hidden_dim=128, ffn_dim=16, shared_ffn_dim=1024)
        result = overlap_saving(cfg, 256, EmulatedLink(0.02, 200), rounds=2, pairs=12, device=device)
    elif p["mode"] in ("two_batch", "static"):
        result = whole_layer_paths(rank, world_size, device, p["mode"])
    elif p["mode"] == "overlap_bitwise":
        result = overlap_bitwise(rank, world_size, device)
    elif p["mode"] == "hash_bad_ids":  # one rank forgets its token ids, or passes a wrong shape: every rank stops
        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=16, ffn_dim=32, router="hash")
        messages = {}
        for dispatcher in ("allgather", "alltoall", "tp", "hierarchical"):  # lesson 10's too: 2 nodes × 1 rank
            layer = MoELayer(cfg, dispatcher, ranks_per_node=1 if dispatcher == "hierarchical" else None).to(device)
            x = torch.randn(4, 16, device=device)
            for bad, ids in (("missing", None), ("shape", torch.arange(3, device=device))):
                try:
                    layer(x, ids if rank == 1 else torch.arange(4, device=device))
                    messages[f"{dispatcher}/{bad}"] = "no error"
                except ValueError as e:
                    messages[f"{dispatcher}/{bad}"] = str(e)
            layer(x, torch.arange(4, device=device))  # the group still works afterwards
        every = [None] * world_size
        dist.all_gather_object(every, messages)
        result = every
    elif p["mode"] == "subgroups":  # two independent groups of 2 ranks, each its own global batch
        GroupedExperts.use_reference_kernel = True
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        group = pairs[rank // 2]
        cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
        rows = []
        for dispatcher, bank in (("allgather", "bmm"), ("alltoall", "grouped"), ("tp", "loop")):
            tokens = [8, 8] if dispatcher == "tp" else [[3, 9], [0, 7]][rank // 2]
            errors = compare_with_single_device(cfg, dispatcher, bank, tokens_per_rank=tokens, group=group,
                                                seed=rank // 2, device=device)
            rows.append({"dispatcher": dispatcher, "group": rank // 2, "errors": errors})
        every = [None] * world_size
        dist.all_gather_object(every, rows)
        result = [row for r in (0, 2) for row in every[r]]  # one rank of each group
    elif p["mode"] == "bad_input":
        cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32)
        messages = {}
        bad_rank = p.get("bad_rank", world_size - 1)
        for dispatcher in ("allgather", "alltoall", "tp"):
            layer = MoELayer(cfg, dispatcher).to(device)
            for bad, x in (("dtype", torch.zeros(4, 16, dtype=torch.float64)), ("shape", torch.zeros(4, 15)),
                           ("3-D", torch.zeros(2, 4, 16))):
                x = x.to(device) if rank == bad_rank else torch.zeros(4, 16, device=device)
                try:
                    layer(x)
                    messages[f"{dispatcher}/{bad}"] = "no error"
                except ValueError as e:
                    messages[f"{dispatcher}/{bad}"] = str(e)
            layer(torch.randn(4, 16, device=device))  # the group still works afterwards
        for key, make in (("divisible",
                           lambda: MoELayer(MoEConfig(num_experts=2 * world_size + 1, top_k=2), "alltoall")),
                          ("tp divisible", lambda: MoELayer(MoEConfig(ffn_dim=4 * world_size + 1), "tp"))):
            try:
                make()
                messages[key] = "no error"
            except ValueError as e:
                messages[key] = str(e)
        every = [None] * world_size
        dist.all_gather_object(every, messages)
        result = every
    elif p["mode"] == "alltoall_autograd":
        import torch.distributed.nn.functional as dnn

        g = torch.Generator().manual_seed(rank)
        in_splits = [(rank + 2 * j) % 3 for j in range(world_size)]  # uneven, zeros included
        every = [None] * world_size
        dist.all_gather_object(every, in_splits)
        out_splits = [every[j][rank] for j in range(world_size)]
        x = torch.randn(sum(in_splits), 5, generator=g).to(device)
        w = torch.randn(sum(out_splits), 5, generator=g).to(device)
        x1 = x.clone().requires_grad_()
        ours = AllToAll.apply(x1, out_splits, in_splits, None)
        (ours * w).sum().backward()
        x2 = x.clone().requires_grad_()
        theirs = dnn.all_to_all_single(torch.empty_like(ours), x2, out_splits, in_splits)
        (theirs * w).sum().backward()
        result = {"forward": (ours - theirs).abs().max().item() if ours.numel() else 0.0,
                  "backward": (x1.grad - x2.grad).abs().max().item() if x.numel() else 0.0}
        diffs = torch.tensor([result["forward"], result["backward"]], device=device)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result = {"forward": diffs[0].item(), "backward": diffs[1].item()}
    elif p["mode"] == "exercise":
        from lessons_lib.course.checker import run_check
        from lessons_lib.course.exercises import alltoall_backward

        def stub(grad, in_splits, out_splits):
            raise NotImplementedError

        def forward_instead(grad, in_splits, out_splits):  # the splits not swapped
            out = grad.new_empty(sum(out_splits), *grad.shape[1:])
            dist.all_to_all_single(out, grad.contiguous(), out_splits, in_splits)
            return out

        def wrong_on_rank_1(grad, in_splits, out_splits):  # the other ranks must not hang in the next case
            out = alltoall_backward(grad, in_splits, out_splits)
            return out + 1 if rank == 1 and out.numel() else out

        statuses = {name: run_check("03.3", fn)["status"] for name, fn in
                    (("solution", alltoall_backward), ("stub", stub), ("forward instead of backward", forward_instead),
                     ("wrong on one rank", wrong_on_rank_1))}
        statuses |= node_bytes_statuses()
        every = [None] * world_size
        dist.all_gather_object(every, statuses)
        assert all(s == every[0] for s in every), every
        result = every[0]
    elif p["mode"] == "exercise_node_bytes":  # 10.3 alone, at any number of ranks (2: where the real world hides
        every = [None] * world_size           # a rank % nodes answer)
        dist.all_gather_object(every, node_bytes_statuses())
        assert all(s == every[0] for s in every), every
        result = every[0]
    elif p["mode"] == "ep_vs_tp":  # lesson 07's comparison at any group size
        from lessons_lib.lab.ep_vs_tp import measure_ep_vs_tp

        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=16, ffn_dim=8 * world_size)
        r = measure_ep_vs_tp(cfg, tokens=2 * world_size, device=device, steps=1, warmup=0)
        result = {name: [r[name]["counted_bytes"], r[name]["model_bytes"]] for name in ("ep", "tp")}
        r = measure_ep_vs_tp(cfg, tokens=2 * world_size, device=device, steps=1, warmup=0, same_global_batch=True)
        result |= {f"{name}, same batch": [r[name]["counted_bytes"], r[name]["model_bytes"], r[name]["tokens_per_rank"]]
                   for name in ("ep", "tp")}
    elif p["mode"] == "bias":
        from lessons_lib.moe.load_balancing import SigmoidBiasRouter, update_expert_bias

        router = SigmoidBiasRouter(MoEConfig(num_experts=4, top_k=2, hidden_dim=8, router="sigmoid_bias")).to(device)
        mine = torch.tensor([[6, 0, 1, 1], [0, 2, 3, 3]][rank % 2], device=device)  # global (2 ranks): 6 2 4 4
        update_expert_bias(router, mine, rate=0.5)
        every = [None] * world_size
        dist.all_gather_object(every, router.expert_bias.tolist())
        result = every
    elif p["mode"] == "train_ep":  # toy.train under EP: the replicated router and bias stay the same everywhere
        from lessons_lib.course.toy import ToyTask, train

        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=16, ffn_dim=32, router="sigmoid_bias",
                        shared_ffn_dim=16)
        layer = MoELayer(cfg, "alltoall").to(device)
        train(layer, ToyTask(16), steps=10, tokens=16, bias_rate=0.01, rank=rank, group=dist.group.WORLD,
              progress=False)
        every = [None] * world_size
        dist.all_gather_object(every, [layer.router.weight.detach().cpu(), layer.router.expert_bias.cpu(),
                                       layer.shared.w1.detach().cpu()])
        from lessons_lib.moe.distributed import all_reduce_grads

        w = layer.router.weight  # a rank without a gradient joins the sum with zeros instead of hanging
        w.grad = torch.ones_like(w) if rank == 0 else None
        all_reduce_grads([w])
        summed_without_hang = bool((w.grad == 1).all())
        result = {"summed_without_hang": summed_without_hang,
                  "router_moved": (every[0][0] - MoELayer(cfg).router.weight).abs().max().item(),
                  "router_diff": max((w - every[0][0]).abs().max().item() for w, _, _ in every),
                  "bias_diff": max((b - every[0][1]).abs().max().item() for _, b, _ in every),
                  "shared_moved": (every[0][2] - MoELayer(cfg).shared.w1).abs().max().item(),
                  "shared_diff": max((s - every[0][2]).abs().max().item() for _, _, s in every)}
    elif p["mode"] == "ep_dp":
        from lessons_lib.lab.equivalence import compare_ep_dp_step

        cfg = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
        result = {bank: compare_ep_dp_step(cfg, ep_size=2, experts=bank, device=device) for bank in ("loop", "grouped")}
        shared = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu", shared_ffn_dim=24,
                           shared_gate=True)  # lesson 08: the shared expert's gradient summed over all ranks
        result["shared"] = compare_ep_dp_step(shared, ep_size=2, experts="grouped", device=device)
        hashed = MoEConfig(num_experts=8, top_k=2, hidden_dim=16, ffn_dim=32, router="hash", shared_ffn_dim=8)
        result["hash"] = compare_ep_dp_step(hashed, ep_size=2, device=device)
        try:
            compare_ep_dp_step(cfg, ep_size=3, device=device)
            result["bad ep_size"] = "no error"
        except ValueError as e:
            result["bad ep_size"] = str(e)
    elif p["mode"] == "traffic":
        result = traffic_check(rank, world_size, device)
    elif p["mode"] == "hierarchical":  # lesson 10: against the single-device layer, on nodes × ranks_per_node
        GroupedExperts.use_reference_kernel = True
        result = []
        for bank, cfg, name, tokens, routing in hierarchical_cases(world_size, p["ranks_per_node"]):
            errors = compare_with_single_device(cfg, "hierarchical", bank, tokens_per_rank=tokens, routing=routing,
                                                device=device, ranks_per_node=p["ranks_per_node"])
            result.append({"experts": bank, "case": name, "errors": errors})
    elif p["mode"] == "placement":  # lesson 11: replicas against the single-device layer
        GroupedExperts.use_reference_kernel = True
        result = []
        for bank, cfg, name, placement, tokens, routing in placement_cases(world_size):
            errors = compare_with_single_device(cfg, "alltoall", bank, tokens_per_rank=tokens, routing=routing,
                                                device=device, placement=placement)
            result.append({"experts": bank, "case": name, "errors": errors})
    elif p["mode"] == "placement_hierarchical":  # lesson 11 behind lesson 10's dispatcher, nodes × ranks_per_node
        from lessons_lib.lab.equivalence import compare_placement_training

        GroupedExperts.use_reference_kernel = True
        R = p["ranks_per_node"]
        rows = []
        for bank, cfg, name, placement, tokens, routing in placement_hierarchical_cases(world_size, R):
            errors = compare_with_single_device(cfg, "hierarchical", bank, tokens_per_rank=tokens, routing=routing,
                                                device=device, ranks_per_node=R, placement=placement)
            rows.append({"experts": bank, "case": name, "errors": errors})
        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
        placements = hierarchical_placements(world_size, R, cfg.num_experts)
        # 20 steps, moved halfway from the node-aware placement to one whose groups changed nodes
        training = compare_placement_training(cfg, placements["node-aware"], placements["groups moved"],
                                              device=device, dispatcher="hierarchical", ranks_per_node=R)
        result = {"rows": rows, "training": training,
                  "nodes_per_token": nodes_per_token(rank, world_size, R, device)}
    elif p["mode"] == "placement_differs":  # lesson 11: a placement that is not the same on every rank
        E = 2 * world_size
        cfg = MoEConfig(num_experts=E, top_k=2, hidden_dim=8, ffn_dim=8)
        same = torch.arange(E).view(world_size, 2)
        other = same.flip(0) if rank == 1 else same
        result = {}
        for name, kw in (("differs", {"placement": other}),
                         ("shape differs", {"placement": same[:, :1] if rank == 1 else same}),
                         ("same on every rank, bad", {"placement": same + E}),
                         ("differs, hierarchical", {"placement": other, "dispatcher": "hierarchical",
                                                    "ranks_per_node": 1})):
            try:
                MoELayer(cfg, kw.pop("dispatcher", "alltoall"), **kw)
                result[name] = "no error"
            except ValueError as e:
                result[name] = str(e)
        layer = MoELayer(cfg, "alltoall", placement=same)
        try:
            layer.set_placement(other)
            result["set_placement differs"] = "no error"
        except ValueError as e:
            result["set_placement differs"] = str(e)
        done = torch.ones(1)
        dist.all_reduce(done)  # every rank got here: none is left waiting
        result["ranks done"] = int(done)
        every = [None] * world_size
        dist.all_gather_object(every, result)
        result = every
    elif p["mode"] == "placement_training":
        from lessons_lib.lab.equivalence import compare_placement_training
        from lessons_lib.moe.placement import place_experts
        E = 2 * world_size
        cfg = MoEConfig(num_experts=E, top_k=2, hidden_dim=16, ffn_dim=32, activation="swiglu")
        first = place_experts(torch.tensor([50.0] + [1.0] * (E - 1)), world_size, 3)
        second = place_experts(torch.tensor([1.0] * (E - 1) + [50.0]), world_size, 3)
        result = compare_placement_training(cfg, first, second, device=device)
    elif p["mode"] == "hierarchical_traffic":  # lesson 10: counted inter-node bytes against the model, exactly
        from lessons_lib.lab.node_traffic import remote_nodes, remote_pairs, split_bytes_by_link
        from lessons_lib.moe.init import init_full_state_dict
        R = p["ranks_per_node"]
        nodes, H = world_size // R, 16
        result = {}
        for name, extra in (("softmax", {}), ("node-limited M=1", {"router": "sigmoid_bias", "num_groups": nodes,
                                                                   "topk_groups": 1})):
            cfg = MoEConfig(num_experts=2 * world_size, top_k=4, hidden_dim=H, ffn_dim=8, **extra)
            sd = init_full_state_dict(cfg)
            x = torch.randn(24, H, generator=torch.Generator().manual_seed(rank))
            rows = {}
            for dispatcher in ("hierarchical", "alltoall"):
                layer = MoELayer(cfg, dispatcher, ranks_per_node=R if dispatcher == "hierarchical" else None)
                layer.load_full_state_dict(sd)
                y, aux = layer(x)
                ids = aux.routing.expert_ids
                if dispatcher == "hierarchical":
                    ph = layer.dispatcher.traffic.phases
                    rows["hier"] = [ph["dispatch inter-node"].sent, ph["combine inter-node"].received,
                                    ph["dispatch inter-node"].received, ph["combine inter-node"].sent]
                    per_node, per_rank = cfg.num_experts // nodes, cfg.num_experts // world_size
                    rows["hier_model"] = 4 * H * sum(len({int(e) // per_node for e in row} - {rank // R})
                                                     for row in ids)  # token by token, apart from the dispatcher
                    rows["intra"] = ph["dispatch intra-node"].sent
                    # the other phases, sent bytes: what comes back inside the node, the slots beside the rows
                    rows["phases"] = {name: ph[name].sent for name in ("combine intra-node", "metadata inter-node",
                                                                       "metadata intra-node", "counts")}
                    # the fan-out: a row per (token, rank holding its experts) whose local rank is not this rank's
                    rows["intra_model"] = 4 * H * sum(len({int(e) // per_rank for e in row} - {r for r in range(
                        world_size) if r % R == rank % R}) for row in ids)
                    assert rows["hier_model"] == 4 * H * remote_nodes(ids, cfg.num_experts, nodes, rank // R)
                else:
                    with torch.no_grad():
                        _, _, state = layer.dispatch(x, aux.routing)
                    rows["flat"] = split_bytes_by_link(state.in_splits, rank, R, 4 * H)["inter-node"]
                    # combine sends back what this rank received: its inter-node part, over all ranks, is the same
                    rows["flat_combine"] = split_bytes_by_link(state.out_splits, rank, R, 4 * H)["inter-node"]
                    rows["flat_model"] = 4 * H * remote_pairs(ids, cfg.num_experts, nodes, rank // R)
                rows[dispatcher] = y
            rows["same_output"] = (rows.pop("hierarchical") - rows.pop("alltoall")).abs().max().item()
            rows["max_nodes"] = int(torch.stack([(ids // (cfg.num_experts // nodes) == n).any(1)
                                                 for n in range(nodes)]).sum(0).max())
            result[name] = rows
        every = [None] * world_size
        dist.all_gather_object(every, result)
        result = every
    elif p["mode"] == "hierarchical_bad_setup":  # every rank refuses, before any collective
        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=8, ffn_dim=8)
        result = {}
        for name, kw in (("R=3", {"dispatcher": "hierarchical", "ranks_per_node": 3}),
                         ("R=0", {"dispatcher": "hierarchical", "ranks_per_node": 0}),
                         ("R for alltoall", {"dispatcher": "alltoall", "ranks_per_node": 2}),
                         ("a group", {"dispatcher": "hierarchical", "group": dist.group.WORLD}),
                         ("capacity", {"dispatcher": "hierarchical", "cfg": MoEConfig(
                             num_experts=2 * world_size, top_k=2, hidden_dim=8, ffn_dim=8, capacity_factor=1.0)}),
                         ("R differs", {"dispatcher": "hierarchical", "ranks_per_node": 1 if rank == 0 else 2}),
                         # torchrun on two machines with different --nproc-per-node: LOCAL_WORLD_SIZE differs
                         ("LOCAL_WORLD_SIZE differs", {"dispatcher": "hierarchical",
                                                       "env": "2" if rank == world_size - 1 else "1"})):
            kw = dict(kw)
            saved = os.environ.get("LOCAL_WORLD_SIZE")
            if "env" in kw:
                os.environ["LOCAL_WORLD_SIZE"] = kw.pop("env")
            try:
                MoELayer(kw.pop("cfg", cfg), **kw)
                result[name] = "no error"
            except ValueError as e:
                result[name] = str(e)
            finally:
                if saved is not None:
                    os.environ["LOCAL_WORLD_SIZE"] = saved
        every = [None] * world_size  # every rank got here: nothing waited in a collective forever
        dist.all_gather_object(every, result)
        result = every
    elif p["mode"] == "overlap_timeline":  # lesson 09's measurement, at a small shape
        from lessons_lib.lab.overlap_timeline import overlap_step_times, timelines
        # rows big enough (256 KiB per rank) that the exchange is still in flight when the shared expert starts
        cfg = MoEConfig(num_experts=2 * world_size, top_k=2, hidden_dim=256, ffn_dim=32, shared_ffn_dim=256)
        result = {"times": overlap_step_times(cfg, 128, rounds=2, steps=2, warmup=1, device=device),
                  "timeline": timelines(cfg, 128, device=device)}
    runtime.finish(result)


if __name__ == "__main__":
    runtime.run(main)
