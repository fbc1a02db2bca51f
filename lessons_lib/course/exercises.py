"""The course's exercises: what the student writes in each lesson, and the library's reference solution.

Every lesson from 01 on ends with two or three. Each is registered here with its title, a hint, the reference
(the library's own code for it, usually one call into `lessons_lib.moe`) and its cases: random inputs and the
edge cases a wrong answer trips on (empty groups, one hot expert, uneven ranks, ties that only a stable sort
keeps in order). `checker` runs a student's function against them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class Exercise:
    lesson: str
    title: str
    hint: str
    reference: Callable
    cases: Callable[[], list]  # [(case name, args tuple)]
    collective: bool = False  # runs on every rank of a process group: the ranks must agree case by case


EXERCISES: dict[str, Exercise] = {}


def _exercise(key: str, title: str, hint: str, cases: Callable[[], list], collective: bool = False):
    def register(reference):
        EXERCISES[key] = Exercise(key.split(".")[0], title, hint, reference, cases, collective)
        return reference
    return register


def collective_device() -> str:
    """Where this rank's tensors must live for a collective: nccl sends GPU tensors, gloo CPU ones."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- lesson 01

@_exercise("01.1", "top-k routing with renormalization",
           "softmax over the experts, then .topk(k); with normalize, divide the k weights by their sum.",
           lambda: [("random", (torch.randn(6, 8, generator=_g(0)), 2, True)),
                    ("no renormalization (Qwen)", (torch.randn(6, 8, generator=_g(1)), 2, False)),
                    ("k = E", (torch.randn(3, 4, generator=_g(2)), 4, True)),
                    ("one token", (torch.randn(1, 5, generator=_g(3)), 1, True)),
                    ("no tokens", (torch.zeros(0, 8), 2, True))])
def topk_routing(logits: torch.Tensor, k: int, normalize: bool):
    """logits [T, E] -> (weights [T, k], expert ids [T, k]), best expert first."""
    from lessons_lib.moe.router import top_k

    return top_k(logits.softmax(dim=-1), k, normalize)


@_exercise("01.2", "combine: the weighted sum of each token's rows",
           "start from zeros [num_tokens, H] and index_add_ the rows times their weights at their tokens.",
           lambda: [("random", (torch.randn(8, 4, generator=_g(0)), torch.tensor([0, 2, 1, 0, 2, 1, 3, 3]),
                                torch.rand(8, generator=_g(1)), 4)),
                    ("a token with no rows", (torch.randn(3, 4, generator=_g(2)), torch.tensor([0, 0, 2]),
                                              torch.rand(3, generator=_g(3)), 3)),
                    ("no rows", (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), 2))])
def combine_rows(rows: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y[t] = Σ weight[i] · rows[i] over the rows i with token[i] == t; y is [num_tokens, H]."""
    y = rows.new_zeros(num_tokens, rows.shape[1])
    return y.index_add(0, token, rows * weight[:, None])


# ---------------------------------------------------------------- lesson 02

def _gathered_experts(seed, n, E, pad):
    ids = torch.randint(E, (n,), generator=_g(seed))
    return torch.cat([ids, torch.full((pad,), -1)])


@_exercise("02.1", "keep this rank's rows of the gathered buffer, bucketed by local expert",
           "mask = (expert >= first) & (expert < last); nonzero() gives the positions; a stable argsort of "
           "their expert ids buckets them, keeping gather order inside a bucket. Padding rows have expert -1.",
           lambda: [("random", (_gathered_experts(0, 20, 8, 4), 4, 8)),
                    ("rank 0", (_gathered_experts(1, 20, 8, 0), 0, 4)),
                    ("no row is mine", (torch.tensor([0, 1, 1, 0, -1]), 2, 4)),
                    ("one hot expert", (torch.tensor([5, 5, 2, 5, -1, -1]), 4, 8)),
                    # many rows per expert: only a stable sort keeps gather order inside a bucket here
                    ("many rows per expert", (_gathered_experts(2, 400, 8, 16), 4, 8))])
def rows_of_rank(gathered_expert: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Positions of the rows whose expert is in first..last-1, grouped by expert, gather order inside."""
    from lessons_lib.moe.dispatch_allgather import rows_of_experts

    return rows_of_experts(gathered_expert, range(first, last))


@_exercise("02.2", "bytes each rank sends with a padded all_gather",
           "every rank pads to the largest row count M and sends its M rows to each of the other N - 1 ranks.",
           lambda: [("balanced", ([16, 16], 512)), ("uneven", ([5, 9, 2, 7], 256)),
                    ("a rank with no rows", ([0, 12, 3], 64)), ("one rank", ([10], 128))])
def allgather_sent_bytes(rows_per_rank: list, row_bytes: int) -> list:
    """[bytes rank r sends] for each rank r, padding included."""
    M, N = max(rows_per_rank), len(rows_per_rank)
    return [(N - 1) * M * row_bytes for _ in rows_per_rank]


# ---------------------------------------------------------------- lesson 03

@_exercise("03.1", "split sizes: how many rows go to each rank",
           "rank r owns experts r*E/N ... (r+1)*E/N - 1, so a row's destination is expert // (E // N); "
           "count them per rank and return a list of Python ints.",
           lambda: [("random", (torch.randint(8, (20,), generator=_g(0)), 8, 2)),
                    ("four ranks, uneven", (torch.randint(16, (13,), generator=_g(1)), 16, 4)),
                    ("one hot expert", (torch.full((10,), 3), 8, 4)),
                    ("E = N", (torch.tensor([0, 2, 2, 1]), 4, 4)),
                    ("no rows", (torch.zeros(0, dtype=torch.long), 8, 2))])
def split_sizes(expert_ids: torch.Tensor, num_experts: int, world_size: int) -> list:
    """[rows for rank 0, rows for rank 1, …] for rows whose experts are `expert_ids`."""
    from lessons_lib.moe.router import count_per_expert

    return count_per_expert(expert_ids // (num_experts // world_size), world_size).tolist()


@_exercise("03.2", "the stable permutation that groups rows by destination rank, and its inverse",
           "order = torch.argsort(dest, stable=True); the inverse puts each row back: inverse[order] = arange.",
           lambda: [("random", (torch.randint(4, (12,), generator=_g(0)),)),
                    ("already grouped", (torch.tensor([0, 0, 1, 1, 1]),)),
                    ("all to one rank", (torch.full((6,), 2),)),
                    # many ties: an unstable sort reorders them (small CPU sorts happen to be stable)
                    ("many rows per rank", (torch.randint(4, (400,), generator=_g(1)),)),
                    ("no rows", (torch.zeros(0, dtype=torch.long),))])
def group_by_rank(dest: torch.Tensor):
    """(order, inverse): dest[order] is sorted, ties in their original order; x[order][inverse] == x."""
    from lessons_lib.moe.dispatch_local import inverse_permutation

    order = torch.argsort(dest, stable=True)
    return order, inverse_permutation(order)


def _alltoall_cases():
    rank, N = dist.get_rank(), dist.get_world_size()
    device = collective_device()
    cases = []
    for name, splits in (("uneven", lambda r, j: (r + 2 * j) % 3), ("balanced", lambda r, j: 2),
                         ("this rank sends nothing", lambda r, j: 0 if r == 0 else 1 + j)):
        in_splits = [splits(rank, j) for j in range(N)]  # what I sent in forward
        out_splits = [splits(j, rank) for j in range(N)]  # what I received in forward
        grad = torch.randn(sum(out_splits), 3, generator=_g(rank)).to(device)  # gradient of what I received
        cases.append((name, (grad, in_splits, out_splits)))
    return cases


@_exercise("03.3", "the backward of the all-to-all",
           "each received row's gradient goes back where the row came from: the same all_to_all_single "
           "with the two split lists swapped (output: in_splits rows, from grad with out_splits).",
           _alltoall_cases, collective=True)
def alltoall_backward(grad: torch.Tensor, in_splits: list, out_splits: list) -> torch.Tensor:
    """Forward sent in_splits[j] rows to rank j and received out_splits[j] from it; grad is the
    gradient of what was received. Returns the gradient of what was sent."""
    from lessons_lib.moe.dispatch_alltoall import AllToAll

    return AllToAll.apply(grad, in_splits, out_splits)  # lesson 03's backward is exactly this exchange


# ---------------------------------------------------------------- lesson 04

@_exercise("04.1", "padded layout for bmm: [E, M_max, H]",
           "row i belongs to expert e = repeat_interleave(arange(E), counts)[i] at place i - (first row of e); "
           "write the rows into zeros [E, max(counts), H] at (expert, place).",
           lambda: [("random", (torch.randn(9, 3, generator=_g(0)), torch.tensor([2, 4, 3]))),
                    ("an empty group", (torch.randn(5, 2, generator=_g(1)), torch.tensor([3, 0, 2]))),
                    ("all in one group", (torch.randn(4, 2, generator=_g(2)), torch.tensor([0, 4, 0]))),
                    ("no rows", (torch.zeros(0, 2), torch.tensor([0, 0])))])
def pad_groups(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, H] grouped by expert (counts[e] rows each) -> [E, max count, H], zero padded."""
    from lessons_lib.moe.experts_batched import pad_by_expert

    return pad_by_expert(x, counts)[0]


@_exercise("04.2", "FLOPs bmm spends on padding",
           "bmm computes E * max(counts) rows; the useful ones are sum(counts).",
           lambda: [("balanced", (torch.tensor([4, 4, 4]), 100)), ("skewed", (torch.tensor([10, 1, 0, 1]), 7)),
                    ("no rows", (torch.tensor([0, 0]), 5))])
def padding_flops(counts: torch.Tensor, flops_per_row: int) -> int:
    return int((len(counts) * counts.max() - counts.sum()) * flops_per_row)


# ---------------------------------------------------------------- lesson 05

@_exercise("05.1", "expert capacity C = ceil(k·T/E · factor)",
           "floats round: 50 * 1.1 is 55.00000000000001. Compute with fractions.Fraction(str(factor)).",
           lambda: [("exact share", (2, 32, 16, 1.0)), ("factor 1.25", (2, 32, 16, 1.25)),
                    ("rounds up", (2, 33, 16, 1.0)), ("float trap", (2, 50, 2, 1.1)), ("no tokens", (2, 0, 8, 1.0))])
def capacity(top_k: int, num_tokens: int, num_experts: int, factor: float) -> int:
    from lessons_lib.moe.capacity import expert_capacity
    from lessons_lib.moe.config import MoEConfig

    return expert_capacity(MoEConfig(num_experts=num_experts, top_k=top_k, capacity_factor=factor), num_tokens)


def _mask_cases():
    e, w = torch.tensor([0, 1, 0, 0, 1, 2]), torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.7])
    return [("probs", (e, w, 3, 2, "probs")), ("position", (e, w, 3, 2, "position")),
            ("random, probs",
             (torch.randint(4, (30,), generator=_g(0)), torch.rand(30, generator=_g(1)), 4, 5, "probs")),
            ("one hot expert, position", (torch.full((7,), 1), torch.rand(7, generator=_g(2)), 3, 3, "position")),
            ("capacity 0", (e, w, 3, 0, "probs"))]


@_exercise("05.2", "the capacity mask under both drop policies",
           "per expert, rank its pairs (by weight, highest first, for 'probs'; by position for 'position') "
           "and keep the first C: sort by the policy's key, then stable-sort by expert, and compare each "
           "pair's place in its expert's group with C.",
           _mask_cases)
def keep_mask(expert: torch.Tensor, weight: torch.Tensor, num_experts: int, capacity: int, policy: str) -> torch.Tensor:
    """[R] bool: which (token, slot) pairs their expert keeps."""
    from lessons_lib.moe.capacity import select_within_capacity

    kept, _ = select_within_capacity(expert, weight, num_experts, capacity, policy)
    return torch.zeros(len(expert), dtype=torch.bool).index_fill(0, kept, True)


# ---------------------------------------------------------------- lesson 06

@_exercise("06.1", "DeepSeek-V3's aux-loss-free bias update",
           "b + rate * sign(mean load - load): up for underloaded experts, down for overloaded, 0 when equal.",
           lambda: [("random", (torch.zeros(4), torch.tensor([10.0, 2.0, 4.0, 4.0]), 0.1)),
                    ("balanced", (torch.tensor([0.3, -0.2]), torch.tensor([5.0, 5.0]), 0.5)),
                    ("from a bias", (torch.randn(6, generator=_g(0)), torch.rand(6, generator=_g(1)) * 10, 0.01))])
def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    from lessons_lib.moe.load_balancing import bias_step

    return bias_step(bias, load, rate)


@_exercise("06.2", "the router z-loss",
           "torch.logsumexp(logits, dim=-1), squared, averaged over the tokens.",
           lambda: [("random", (torch.randn(5, 8, generator=_g(0)),)),
                    ("large logits", (10 * torch.randn(3, 4, generator=_g(1)),))])
def z_loss(logits: torch.Tensor) -> torch.Tensor:
    from lessons_lib.moe.load_balancing import router_z_loss
    from lessons_lib.moe.router import Routing

    T = logits.shape[0]
    return router_z_loss(Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), logits.softmax(-1), logits))


@_exercise("06.3", "the Switch-style auxiliary loss, E · Σ f_i · P_i",
           "f_i: the fraction of the T·k chosen (token, slot) pairs that went to expert i; P_i: the mean of "
           "probs[:, i] over the tokens. It is 1 when routing is uniform.",
           lambda: [("random",
                     (torch.randint(4, (6, 2), generator=_g(0)), torch.rand(6, 4, generator=_g(1)).softmax(-1))),
                    ("uniform", (torch.tensor([[0], [1], [2], [3]]), torch.full((4, 4), 0.25))),
                    ("collapsed", (torch.zeros(5, 1, dtype=torch.long), torch.tensor([[1.0, 0, 0]]).repeat(5, 1)))])
def aux_loss(expert_ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    from lessons_lib.moe.router import Routing, load_balancing_loss

    routing = Routing(expert_ids, torch.ones_like(expert_ids, dtype=torch.float32), probs, probs.log())
    return load_balancing_loss(routing, probs.shape[1])


def _hash_cases():
    zipf = torch.multinomial(1.0 / torch.arange(1, 201, dtype=torch.float64), 300, replacement=True, generator=_g(1))
    return [("uniform ids", (torch.randint(1000, (64,), generator=_g(0)), 8, 2, 0)),
            ("one id repeated", (torch.full((10,), 7), 8, 2, 0)),
            ("a Zipf stream", (zipf, 16, 4, 3)),
            ("another seed", (torch.arange(20), 6, 3, 5)),
            ("no tokens", (torch.zeros(0, dtype=torch.long), 4, 1, 0))]


@_exercise("06.4", "the random hash's load on a stream of token ids",
           "a token's experts are not its id, nor its id modulo E: the hash scores every (id, expert) pair "
           "(expert_hash, from lessons_lib.moe.hash_router), and a token goes to its k best-scored experts. "
           "Count how many (token, expert) pairs land on each expert, one count per expert, zeros included.",
           _hash_cases)
def hash_load(token_ids: torch.Tensor, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    from lessons_lib.moe.config import MoEConfig
    from lessons_lib.moe.hash_router import HashRouter

    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, hidden_dim=1, ffn_dim=1, router="hash", seed=seed)
    return HashRouter(cfg)(torch.zeros(len(token_ids), 1), token_ids).tokens_per_expert(num_experts)


# ---------------------------------------------------------------- lesson 07

@_exercise("07.1", "EP bytes per rank, dispatch + combine",
           "dispatch sends T·k rows of h elements, (N-1)/N of them leave the rank; combine is the same size again.",
           lambda: [("worked example", (4, 1024, 2, 8, 2)), ("two ranks", (4096, 7168, 8, 2, 2)),
                    ("one rank", (16, 64, 2, 1, 4))])
def ep_bytes(tokens: int, hidden: int, top_k: int, group_size: int, bytes_per_element: int) -> float:
    from lessons_lib.lab.comm_model import ep_bytes_per_rank

    return float(ep_bytes_per_rank(tokens, hidden, top_k, group_size, bytes_per_element))


@_exercise("07.2", "TP bytes per rank, one ring all-reduce of [T, h]",
           "a ring all-reduce of V bytes sends 2·(N-1)/N·V per rank; here V = T·h·bytes_per_element.",
           lambda: [("worked example", (32, 1024, 8, 2)), ("two ranks", (4096, 2048, 2, 2)),
                    ("one rank", (16, 64, 1, 4))])
def tp_bytes(tokens: int, hidden: int, group_size: int, bytes_per_element: int) -> float:
    from lessons_lib.lab.comm_model import tp_bytes_per_rank

    return float(tp_bytes_per_rank(tokens, hidden, group_size, bytes_per_element))


# ---------------------------------------------------------------- lesson 08

def _block_case(seed, T, H, S, gated, activation):
    g = _g(seed)
    x, routed = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    first = 2 * S if activation == "swiglu" else S  # swiglu: the gate's S columns, then the up projection's S
    w1, w2 = torch.randn(H, first, generator=g) / H ** 0.5, torch.randn(S, H, generator=g) / S ** 0.5
    return x, routed, w1, w2, (torch.randn(1, H, generator=g) if gated else None), activation


@_exercise("08.1", "the block's output: routed experts plus the shared expert",
           "the shared expert is one more FFN, the same kind as an expert: x through w1, the activation, then w2 "
           "(swiglu: w1's first S columns are the gate, its last S the up projection; silu of the gate times the "
           "up). A gate, where there is one, scales the shared part only, by a sigmoid of one number per token.",
           lambda: [("DeepSeek-V3: swiglu, not gated", _block_case(0, 6, 8, 12, False, "swiglu")),
                    ("Qwen2-MoE: swiglu, gated", _block_case(1, 6, 8, 12, True, "swiglu")),
                    ("gelu, gated", _block_case(2, 5, 8, 4, True, "gelu")),
                    ("one token", _block_case(3, 1, 4, 4, True, "swiglu")),
                    ("no tokens", _block_case(4, 0, 4, 4, True, "gelu"))])
def block_output(x: torch.Tensor, routed: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    from lessons_lib.moe.config import MoEConfig
    from lessons_lib.moe.init import first_weight_name
    from lessons_lib.moe.shared_expert import SharedExpert

    H, S = w2.shape[1], w2.shape[0]
    cfg = MoEConfig(num_experts=1, top_k=1, hidden_dim=H, ffn_dim=1, shared_ffn_dim=S, shared_gate=gate is not None,
                    activation=activation)
    shared = SharedExpert(cfg)
    with torch.no_grad():
        getattr(shared, first_weight_name(cfg)).copy_(w1)
        shared.w2.copy_(w2)
        if gate is not None:
            shared.gate.copy_(gate)
        return routed + shared(x)


@_exercise("08.2", "distinct ranks per token",
           "first say which rank holds each of a token's k experts (ranks own equal, consecutive blocks of "
           "experts); then count the different ranks in each token's row: two experts on one rank count once.",
           lambda: [("random", (torch.randint(16, (8, 4), generator=_g(0)), 16, 4)),
                    ("all on one rank", (torch.tensor([[4, 5], [5, 4]]), 8, 4)),
                    ("every rank", (torch.tensor([[0, 2, 4, 6]]), 8, 4)),
                    ("one rank in all", (torch.randint(6, (3, 3), generator=_g(1)), 6, 1)),
                    ("top-1", (torch.randint(8, (5, 1), generator=_g(2)), 8, 2)),
                    ("no tokens", (torch.zeros(0, 2, dtype=torch.long), 8, 2))])
def ranks_per_token(expert_ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    from lessons_lib.lab.granularity import distinct_ranks

    return distinct_ranks(expert_ids, num_experts, world_size)


@_exercise("08.3", "DeepSeekMoE's segmentation and shared experts, at constant compute",
           "two steps, as DeepSeekMoE takes them (§3.1, then §3.2): what must segmenting by m do to the experts' "
           "number, width and top-k if parameters and FLOPs per token are to stay? Then K_s fine experts become "
           "shared, which every token passes: what must the router give up for the FLOPs to stay? Return ints.",
           lambda: [("DeepSeekMoE 2B-like: 16 experts, m = 4, 1 shared", (16, 4096, 2, 4, 1)),
                    ("no segmentation, no shared", (8, 1024, 2, 1, 0)),
                    ("segmented, 2 shared", (32, 16384, 1, 8, 2)),
                    ("only segmented", (8, 512, 2, 2, 0))])
def deepseekmoe_config(num_experts: int, ffn_dim: int, top_k: int, m: int, shared: int) -> tuple:
    from lessons_lib.lab.granularity import deepseekmoe

    c = deepseekmoe(num_experts, ffn_dim, top_k, m, shared)
    return c["routed_experts"], c["ffn_dim"], c["top_k"], c["shared_ffn_dim"]


# ---------------------------------------------------------------- lesson 09

@_exercise("09.1", "a step's time with work beside its exchanges",
           "an exchange with work beside it costs only what the work does not cover; work longer than its "
           "exchange hides all of it. The step without overlap paid every exchange and every work in full.",
           lambda: [("the layer on a slow link", (93.7, [(11.4, 9.8), (11.4, 20.6)])),
                    ("work longer than each exchange", (50.0, [(4.0, 9.0), (4.0, 18.0)])),
                    ("nothing beside", (20.0, [(5.0, 0.0)])),
                    ("no exchange", (12.0, []))])
def step_with_overlap_ms(step_ms: float, pairs: list) -> float:
    """pairs: (exchange_ms, work_ms) of each exchange and the work that can run beside it."""
    return step_ms - sum(min(exchange, work) for exchange, work in pairs)


@_exercise("09.2", "two micro-batches, with a fixed cost per exchange",
           "write the four phases of the schedule in order (dispatch a; dispatch b beside experts a; combine a "
           "beside experts b; combine b), where two run beside each other the longer counts. Then ask what a "
           "half of each phase takes: which part of an exchange depends on how many rows it carries, and which "
           "part does not?",
           lambda: [("experts longer", (4.0, 6.0, 2.0, 0.0)), ("communication longer", (10.0, 2.0, 8.0, 0.0)),
                    ("a fixed cost", (4.0, 6.0, 2.0, 1.0)), ("only fixed costs", (1.0, 0.5, 1.0, 1.0)),
                    ("no communication", (0.0, 5.0, 0.0, 0.0))])
def two_batch_ms(dispatch_ms: float, experts_ms: float, combine_ms: float, fixed_ms: float) -> float:
    from lessons_lib.lab.two_batch_times import two_batch_model_ms

    return two_batch_model_ms(dispatch_ms, experts_ms, combine_ms, fixed_ms)


# ---------------------------------------------------------------- lesson 10

@_exercise("10.1", "distinct remote nodes per token",
           "node of an expert = expert id // (num_experts // nodes); mark each token's nodes in a [T, nodes] "
           "boolean tensor, clear the column of this rank's own node, sum each row.",
           lambda: [("random", (torch.randint(16, (6, 4), generator=_g(0)), 16, 4, 1)),
                    ("all on the own node", (torch.tensor([[0, 1], [2, 3]]), 8, 2, 0)),
                    ("k experts on one remote node", (torch.tensor([[4, 5, 6, 7]]), 8, 2, 0)),
                    ("top-1", (torch.randint(8, (5, 1), generator=_g(1)), 8, 4, 3)),
                    ("no tokens", (torch.zeros(0, 2, dtype=torch.long), 8, 2, 0))])
def remote_nodes_per_token(expert_ids: torch.Tensor, num_experts: int, nodes: int, node: int) -> torch.Tensor:
    """[T] how many nodes other than `node` each token's experts [T, k] are on."""
    from lessons_lib.lab.node_traffic import remote_nodes_per_token as reference

    return reference(expert_ids, num_experts, nodes, node)


@_exercise("10.2", "hop 1's split sizes: rows to each node, once per (token, node)",
           "a token goes to node n once if any of its experts is there: the same [T, nodes] marks as 10.1, "
           "own node included, summed over the tokens; return a list of ints.",
           lambda: [("random", (torch.randint(16, (6, 4), generator=_g(0)), 16, 4)),
                    ("every token to one node", (torch.tensor([[4, 5], [6, 7], [5, 4]]), 8, 2)),
                    ("one node", (torch.randint(6, (3, 2), generator=_g(1)), 6, 1)),
                    ("no tokens", (torch.zeros(0, 2, dtype=torch.long), 8, 4))])
def hop1_splits(expert_ids: torch.Tensor, num_experts: int, nodes: int) -> list:
    from lessons_lib.moe.dispatch_hierarchical import node_hits

    return node_hits(expert_ids, num_experts // nodes, nodes).sum(0).tolist()


def _inter_node_cases():
    rank, N = dist.get_rank(), dist.get_world_size()
    device = collective_device()
    per_node = [R for R in (2, 1, N) if N % R == 0]  # 2 ranks a node where it divides; one rank a node; one node
    cases = [(f"{N // R} nodes × {R}", (torch.randint(4 * N, (5 + rank, 3), generator=_g(rank)).to(device), 4 * N,
                                       rank, R, N // R, 7))
             for R in dict.fromkeys(per_node)]
    # Clusters larger than the real world, where a rank's node (rank // ranks_per_node) is not rank % nodes, which
    # the real world cannot tell apart at 2 ranks: real rank r plays rank 2r + 1 of 2 nodes × 2N (node 0, while
    # 2r + 1 % 2 = 1), then rank N + r of 4 nodes × N (node 1). 2 experts a rank.
    E = 4 * N
    own = torch.randint(E // 2, (4, 2), generator=_g(10 + rank)).to(device)  # experts of node 0 only
    cases += [(f"real rank r as rank 2r + 1 of 2 nodes × {2 * N}, tokens on its own node",
               (own, E, 2 * rank + 1, 2 * N, 2, 5)),
              (f"real rank r as rank 2r + 1 of 2 nodes × {2 * N}",
               (torch.randint(E, (6, 3), generator=_g(20 + rank)).to(device), E, 2 * rank + 1, 2 * N, 2, 5)),
              (f"real rank r as rank N + r of 4 nodes × {N}",
               (torch.randint(8 * N, (6, 3), generator=_g(30 + rank)).to(device), 8 * N, N + rank, N, 4, 3))]
    return cases


@_exercise("10.3", "the inter-node bytes of one hierarchical dispatch, over all ranks",
           "the rank given is this rank's place in a cluster of nodes × ranks_per_node (the check makes up clusters "
           "larger than the real world): its node is rank // ranks_per_node; its bytes are (its tokens' distinct "
           "remote nodes, summed) · row_bytes (10.1); all_reduce them over every real rank and return the total as "
           "an int.",
           _inter_node_cases, collective=True)
def inter_node_bytes(expert_ids: torch.Tensor, num_experts: int, rank: int, ranks_per_node: int, nodes: int,
                     row_bytes: int) -> int:
    """The bytes the hierarchical dispatch of every real rank's tokens sends across nodes, summed (an int); this
    real rank's tokens belong to rank `rank` of a cluster of nodes × ranks_per_node."""
    from lessons_lib.lab.node_traffic import remote_nodes

    mine = torch.tensor([remote_nodes(expert_ids, num_experts, nodes, rank // ranks_per_node) * row_bytes],
                        device=expert_ids.device)
    dist.all_reduce(mine)
    return int(mine.item())


# ---------------------------------------------------------------- lesson 11

@_exercise("11.1", "the load each rank carries under a placement",
           "an expert's load is split evenly over its replicas: count each expert's slots (torch.bincount of the "
           "flattened placement), divide the loads by the counts, index by the placement, sum each rank's row.",
           lambda: [("one replica each", (torch.tensor([[0, 1], [2, 3]]), torch.tensor([4.0, 1.0, 2.0, 3.0]))),
                    ("a hot expert on every rank", (torch.tensor([[0, 1, 3], [2, 3, 3]]),
                                                    torch.tensor([1.0, 2.0, 3.0, 12.0]))),
                    ("random", (torch.tensor([[0, 4, 1], [2, 4, 3], [4, 0, 5]]), torch.rand(6, generator=_g(0))))])
def per_rank_load(placement: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    from lessons_lib.moe.placement import rank_loads

    return rank_loads(placement, load)


@_exercise("11.2", "how many replicas each expert gets",
           "start from one each; give each spare slot to the expert whose load per replica (load / replicas) is "
           "largest at that moment, the lower id on a tie (a loop, or heapq).",
           lambda: [("two spare slots", (torch.tensor([90.0, 30.0, 20.0, 10.0]), 6)),
                    ("no spare slot", (torch.tensor([5.0, 1.0]), 2)),
                    ("a tie", (torch.tensor([2.0, 2.0, 1.0]), 4)),
                    ("Zipf", (1.0 / torch.arange(1, 9, dtype=torch.float64), 12)),
                    # the load per replica before the spare slot decides, not after: [3, 1] would leave 2.0 per
                    # replica of expert 1 where [2, 2] leaves at most 1.5 (the case: after the slot, a tie
                    # decides it), and for [5, 3] [3, 1] leaves 3.0 where [2, 2] leaves 2.5 (no tie on the way)
                    ("the load per replica now, not after the slot", (torch.tensor([3.0, 2.0]), 4)),
                    ("now, not after the slot, without a tie", (torch.tensor([5.0, 3.0]), 4))])
def replicas_per_expert(load: torch.Tensor, num_slots: int) -> list:
    from lessons_lib.moe.placement import replica_counts

    return replica_counts(load, num_slots)


@_exercise("11.3", "which replica a pair goes to, pairs in (token, slot) order",
           "slots of expert e = the flat slot ids p with placement.flatten()[p] == e, in order; the pairs of e "
           "on this rank, in (token, slot) order (expert_ids row by row, as .flatten() reads it), take them in turn "
           "starting at replica number rank % count.",
           lambda: [("a hot expert on two ranks", (torch.tensor([[0, 1, 3], [2, 3, 3]]),
                                                   torch.tensor([[3, 0], [3, 1], [3, 2], [1, 3]]), 1)),
                    # expert 1's pairs in (token, slot) order are (0, 1), (1, 0), (2, 0); (slot, token) order
                    # would take (1, 0), (2, 0), (0, 1) and hand out its two replicas differently
                    ("(token, slot) order", (torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 1], [1, 2], [1, 0]]),
                                             0)),
                    ("no replica", (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 2], [3, 1]]), 0)),
                    ("random", (torch.tensor([[0, 4, 1], [2, 4, 3], [4, 0, 5]]),
                                torch.randint(6, (7, 2), generator=_g(1)), 2))])
def replica_of_pair(placement: torch.Tensor, expert_ids: torch.Tensor, rank: int) -> torch.Tensor:
    """[T, k] the physical slot each (token, slot) pair of `rank` goes to: the pairs of each expert, in (token, slot)
    order, take its replicas in turn, starting from replica rank % (its replica count)."""
    from lessons_lib.moe.placement import Replicas

    return Replicas(placement, int(placement.max()) + 1, rank, placement.shape[0]).physical(expert_ids)


# ---------------------------------------------------------------- lesson 12

def _fp8_cases(seed: int):
    x = torch.randn(4, 256, generator=_g(seed)) * 3
    x[1] = 0.0  # a row of zeros
    x[2, 5] = 900.0  # an outlier channel in the first tile
    return x


@_exercise("12.1", "quantize rows to FP8, one power-of-two scale per tile",
           "view the rows as [M, H / tile, tile]; amax of each tile; scale = 2 ** ceil(log2(amax / 448)), 1 where "
           "amax is 0; q = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn); return (q.float() as [M, H], "
           "scale [M, H / tile]).",
           lambda: [("random, tiles of 128", (_fp8_cases(0), 128)),
                    ("one scale per row", (_fp8_cases(1), 256)),
                    ("tiny values", (torch.randn(3, 64, generator=_g(2)) * 1e-6, 32))])
def fp8_quantize(x: torch.Tensor, tile: int):
    """(the e4m3 values as float32 [M, H], the scales [M, H / tile])."""
    from lessons_lib.moe.fp8 import quantize_fp8

    q, scale = quantize_fp8(x, tile)
    return q.float(), scale


@_exercise("12.2", "dequantize FP8 rows",
           "each of the H / tile scales multiplies its tile of the row: view q as [M, H / tile, tile], multiply by "
           "scale[..., None], view back as [M, H].",
           lambda: [("tiles of 128", (*fp8_quantize(_fp8_cases(3), 128),)),
                    ("one scale per row", (*fp8_quantize(_fp8_cases(4), 256),)),
                    ("no rows", (torch.zeros(0, 256), torch.ones(0, 2)))])
def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, H] float32 from the e4m3 values (as float32) and their scales."""
    M, H = q.shape
    return (q.view(M, scale.shape[1], H // scale.shape[1]) * scale.unsqueeze(-1)).view(M, H)


@_exercise("12.3", "the bytes a rank's FP8 dispatch puts on the wire",
           "each row that goes to another rank carries H bytes of e4m3 values and 4 bytes per scale, one scale "
           "per tile channels; rows to this rank's own experts stay put. Count the rows per destination rank.",
           lambda: [("2 ranks", (torch.tensor([[0, 3], [1, 2], [2, 3]]), 4, 2, 0, 7168, 128)),
                    ("4 ranks, rank 2", (torch.randint(16, (9, 4), generator=_g(5)), 16, 4, 2, 1024, 128)),
                    ("one rank", (torch.tensor([[0, 1]]), 2, 1, 0, 256, 128))])
def fp8_dispatch_bytes(expert_ids: torch.Tensor, num_experts: int, world_size: int, rank: int, hidden: int,
                       tile: int) -> int:
    """Bytes rank `rank` sends in an FP8 dispatch of its [T, k] expert ids (experts placed contiguously)."""
    remote = int((expert_ids // (num_experts // world_size) != rank).sum())
    return remote * (hidden + 4 * (hidden // tile))


# ---------------------------------------------------------------- lesson 13

def _fp4_case(seed: int, K: int = 64, N: int = 4):
    w = torch.randn(K, N, generator=_g(seed)) * torch.logspace(-2, 1, N)  # columns of very different sizes
    w[:32, 0] = 0.0  # a block of zeros
    return (w,)


@_exercise("13.1", "weights rounded to MXFP4",
           "blocks of 32 run down each column (the dimension a GEMM sums over); a block's scale is a power of two "
           "chosen so that its largest magnitude lands in [4, 8); each scaled value goes to the nearest of e2m1's "
           "magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (the lower one on a tie) with its sign; scale back.",
           lambda: [("random columns", _fp4_case(0)), ("another draw", _fp4_case(1, 96, 2)),
                    ("exact grid values", (torch.tensor([[6.0, -0.5], [3.0, 1.5]]).repeat(16, 1),))])
def fp4_round(w: torch.Tensor) -> torch.Tensor:
    """w [K, N] -> the values MXFP4 stores for it, as float32 [K, N]."""
    from lessons_lib.moe.fp4 import dequantize_fp4, quantize_fp4

    return dequantize_fp4(*quantize_fp4(w), torch.float32)


@_exercise("13.2", "the bytes of an expert's weights in each format",
           "bf16: 2 bytes a value. FP8 (DeepSeek-V3): 1 byte a value and one fp32 scale per 128 × 128 block. "
           "MXFP4: half a byte a value and one 1-byte scale per 32 values. Return an int.",
           lambda: [("DeepSeek-V3's expert, bf16", (7168, 2048, 3, "bf16")),
                    ("DeepSeek-V3's expert, FP8", (7168, 2048, 3, "fp8")),
                    ("DeepSeek-V3's expert, MXFP4", (7168, 2048, 3, "mxfp4")),
                    ("a small GELU expert, MXFP4", (256, 512, 2, "mxfp4"))])
def expert_weight_bytes(hidden: int, ffn: int, matrices: int, fmt: str) -> int:
    """The bytes of one expert: `matrices` matrices of hidden × ffn values (3 for SwiGLU, 2 for GELU)."""
    from lessons_lib.moe.fp4 import BLOCK

    values = matrices * hidden * ffn
    per_format = {"bf16": 2 * values, "fp8": values + 4 * values // (128 * 128),
                  "mxfp4": values // 2 + values // BLOCK}
    return per_format[fmt]


# ---------------------------------------------------------------- lesson 14

def _cache_case(seed: int, S: int, start: int, max_len: int = 8):
    g = _g(seed)
    q, k, v = (torch.randn(2, 2, S, 4, generator=g) for _ in range(3))
    cache_k, cache_v = torch.randn(2, 2, max_len, 4, generator=g), torch.randn(2, 2, max_len, 4, generator=g)
    return q, k, v, cache_k, cache_v, start


@_exercise("14.1", "a KV-cache attention step",
           "write k, v into the caches at positions start .. start+S-1; keep the caches up to start+S; query i (at "
           "position start + i) may see keys 0 .. start + i: a boolean mask for F.scaled_dot_product_attention, "
           "or softmax(q·kᵀ/√d + mask)·v by hand. Return the output and both caches.",
           lambda: [("prefill", _cache_case(0, 5, 0)), ("one decode step", _cache_case(1, 1, 5)),
                    ("a chunk after a prefix", _cache_case(2, 3, 4)), ("the last position", _cache_case(3, 1, 7))])
def cached_attention(q, k, v, cache_k, cache_v, start: int):
    """(y [B, heads, S, d], cache_k, cache_v): the caches as the step leaves them, for the next step."""
    from lessons_lib.model.transformer import attend

    return attend(q, k, v, cache_k, cache_v, start), cache_k, cache_v


@_exercise("14.2", "where the expert GEMMs turn compute-bound",
           "balanced, a rank's L = E / N experts share the T·k rows of its tokens' worth of pairs; a bf16 weight "
           "(2 bytes) does 2 FLOPs per row. The GEMMs are compute-bound where FLOPs per byte read pass the ridge: "
           "return the smallest whole number of tokens per rank that reaches it.",
           lambda: [("DeepSeek-V3 on 8 GPUs", (256, 8, 8, 200.0)), ("on 64 GPUs", (256, 8, 64, 200.0)),
                    ("a low ridge", (64, 2, 4, 10.0)), ("a ridge between two counts", (8, 2, 2, 5.5))])
def compute_bound_tokens(num_experts: int, top_k: int, ranks: int, ridge_flops_per_byte: float) -> int:
    from lessons_lib.lab.decode_latency import compute_bound_tokens as reference

    return reference(num_experts, top_k, ranks, ridge_flops_per_byte)


# ---------------------------------------------------------------- lesson 15

@_exercise("15.1", "the bytes of a static decode receive buffer",
           "each of the L = E / N local experts keeps a slot for every token of every rank: L · N · T rows of H "
           "values of bytes_per_value bytes each.",
           lambda: [("DeepSeek-V3 at 8 ranks", (256, 8, 128, 7168, 2)), ("64 ranks, FP8", (256, 64, 128, 7168, 1)),
                    ("one token", (8, 2, 1, 16, 4)), ("E = N", (4, 4, 3, 8, 2))])
def decode_buffer_bytes(num_experts: int, ranks: int, max_tokens: int, hidden: int, bytes_per_value: int) -> int:
    from lessons_lib.lab.decode_latency import static_buffer_bytes
    from lessons_lib.moe.config import MoEConfig

    cfg = MoEConfig(num_experts=num_experts, top_k=1, hidden_dim=hidden)
    return static_buffer_bytes(cfg, max_tokens, ranks, bytes_per_value)["bytes"]["static_received"]


@_exercise("15.2", "the decode floor: reading the touched experts' weights once",
           "a token picks k of the E experts, each equally likely; an expert of this rank is untouched only if "
           "every one of the step's tokens (over all ranks) passed it by. Its weights are read once if touched: "
           "expected bytes over the bandwidth, in ms.",
           lambda: [("one token, DeepSeek-V3 at EP 8", (1, 8, 256, 32, 88_080_384, 4000.0)),
                    ("a large batch", (1024, 8, 256, 32, 88_080_384, 4000.0)),
                    ("every expert chosen", (3, 4, 4, 2, 1000, 1.0)), ("no tokens", (0, 2, 8, 4, 1000, 1.0))])
def decode_floor_ms(tokens: int, top_k: int, num_experts: int, local_experts: int, expert_bytes: int,
                    gb_per_s: float) -> float:
    from lessons_lib.lab.decode_latency import decode_floor_ms as reference

    return reference(tokens, top_k, num_experts, local_experts, expert_bytes, gb_per_s)
