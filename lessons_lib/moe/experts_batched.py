"""Batched expert banks: padded bmm and grouped GEMM (lesson 04).

Lesson 01's `LoopExperts` launches 2 small GEMMs per expert. With many experts and few
rows each, every GEMM is small: the GPU runs it far below its peak (one launch each, too little
work to fill the machine) and the CPU spends its time re-reading weights. Two ways to batch:

- `BmmExperts` pads every expert's group of rows to the largest group, [L, M_max, H], and
  runs one `torch.bmm` per weight. Simple and fast when routing is balanced; when it is skewed,
  most of what it multiplies is padding. It reports the FLOPs it spent on padding.
- `GroupedExperts` runs one grouped GEMM over variable-size groups, given their offsets
  (`torch._grouped_mm`): no padding. Where no fast kernel exists for the device and dtype
  (it needs bf16 on a Hopper-class GPU) it runs the same grouped GEMM written as a loop
  (`LoopedGroupedMM`: one mm per group, each written in place), or one bmm when every group has
  the same size (lesson 05's static shapes), and says which in `.path`.

All three banks read the same stacked weights w1 [L, H, F] (w13 [L, H, 2F] for swiglu) and w2 [L, F, H]: two
GEMMs per expert, whichever the activation.
Shapes as in `dispatcher`: L experts held here, M rows grouped by local expert, H hidden, F inner size.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .config import MoEConfig
from .experts import ExpertBank, activate


def flops_per_row(cfg: MoEConfig, ffn_dim: int | None = None) -> int:
    """Forward FLOPs of one row through one expert: 2·H·F per matrix, 2 matrices (3 for swiglu: w13 is two).
    `ffn_dim`: the part of F a tensor-parallel rank holds (default: all of it)."""
    F = cfg.ffn_dim if ffn_dim is None else ffn_dim
    return 2 * cfg.hidden_dim * F * (3 if cfg.activation == "swiglu" else 2)


def pad_by_expert(x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None):
    """x_MH grouped by expert (counts_L[e] rows each; `sizes`: the same on the host, if known) ->
    (padded [L, max count, H] with zero rows, expert_M and slot_M: where each row went, so that
    padded[expert_M, slot_M] == x_MH)."""
    L, M = len(counts_L), x_MH.shape[0]
    if sizes is not None:
        m_max = max(sizes, default=0)
    else:
        m_max = int(counts_L.max()) if L else 0  # the one host sync: the padded shape
    expert_M = torch.repeat_interleave(torch.arange(L, device=x_MH.device), counts_L, output_size=M)  # its group
    slot_M = torch.arange(M, device=x_MH.device) - (torch.cumsum(counts_L, 0) - counts_L)[expert_M]  # place in it
    return x_MH.new_zeros(L, m_max, x_MH.shape[1]).index_put((expert_M, slot_M), x_MH), expert_M, slot_M


class BmmExperts(ExpertBank):
    """Pad every expert's rows to the largest group, then one bmm per weight matrix."""

    path = "padded to the largest group, one bmm per weight"

    def __init__(self, cfg: MoEConfig, experts: range, ffn_slice: slice | None = None):
        super().__init__(cfg, experts, ffn_slice)
        self.useful_flops = 0  # of the last forward
        self.padding_flops = 0

    def forward(self, x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        L, M = self.num_local_experts, x_MH.shape[0]
        padded, expert_M, slot_M = pad_by_expert(x_MH, counts_L, sizes)
        m_max = padded.shape[1]
        w_in, w2 = self.weights()
        y = torch.bmm(activate(torch.bmm(padded, w_in), self.cfg.activation), w2)
        per_row = flops_per_row(self.cfg, w2.shape[1])
        self.useful_flops = M * per_row
        self.padding_flops = (L * m_max - M) * per_row
        return y[expert_M, slot_M]  # drop the padding rows


_PROBED: dict = {}


def grouped_mm_support(device: torch.device, dtype: torch.dtype, cfg: MoEConfig,
                       reference_ok: bool = False, ffn_dim: int | None = None) -> tuple[bool, str]:
    """Whether `torch._grouped_mm` runs here (forward and backward) fast enough to use, and why not.

    Its fast kernel needs a CUDA GPU of compute capability 9.0+ (Hopper) and bf16. Elsewhere PyTorch
    has a slow reference kernel, used only with `reference_ok` (tests, and the lesson on a CPU).
    Rows must be 16-byte aligned: H, and `ffn_dim`, the part of F the bank holds (default: all of it; a
    tensor-parallel slice can be misaligned where F is not). Found out once per (device, dtype) by running
    a tiny grouped GEMM forward and backward, so a torch without the kernel falls back instead of failing
    mid-training.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    fast = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0) and dtype == torch.bfloat16
    if not fast and not reference_ok:
        if device.type != "cuda":
            return False, (f"no fast grouped GEMM kernel on {device.type} "
                           "(torch's reference one is slower than the loop)")
        if torch.cuda.get_device_capability(device) < (9, 0):
            return False, f"{torch.cuda.get_device_name(device)} is older than Hopper (sm_90)"
        return False, f"the fast grouped GEMM kernel takes bfloat16, the layer is {dtype}"
    align = 16 // torch.empty(0, dtype=dtype).element_size()
    F = cfg.ffn_dim if ffn_dim is None else ffn_dim
    if cfg.hidden_dim % align or F % align:
        return False, f"hidden_dim and the bank's ffn width ({F}) must be multiples of {align} (16-byte aligned rows)"
    key = (str(device), dtype)
    if key not in _PROBED:
        try:
            with torch.enable_grad():  # the caller may be under no_grad; the probe needs backward
                _probe_grouped_mm(device, dtype)
            _PROBED[key] = (True, "torch._grouped_mm" + ("" if fast else " (reference kernel)"))
        except RuntimeError as e:
            _PROBED[key] = (False, f"torch._grouped_mm failed here: {str(e).splitlines()[0]}")
    return _PROBED[key]


def _probe_grouped_mm(device, dtype) -> None:
    a = torch.randn(24, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 16, 32, device=device, dtype=dtype, requires_grad=True)
    offs = torch.tensor([8, 8, 24], device=device, dtype=torch.int32)  # an empty group too
    torch._grouped_mm(a, w, offs=offs).square().sum().backward()


class LoopedGroupedMM(torch.autograd.Function):
    """A grouped GEMM written as a loop, for devices without a grouped GEMM kernel:
    out[rows of group g] = x[rows of group g] @ w[g], for x [M, K] grouped by `sizes` (one int per group,
    summing to M) and w [G, K, N].

    The loop bank computes the same products, but each into a new tensor: forward concatenates the E
    outputs, and backward (through `unbind`) stacks E separate weight gradients into one. Here every
    product is written in place, into one [M, N] output and, in backward, into one [G, K, N] weight
    gradient, as a grouped GEMM kernel does: no copies (lesson 04 measures what that saves on a CPU).
    """

    @staticmethod
    def forward(ctx, x, w, sizes: list[int]):
        if len(sizes) != w.shape[0] or sum(sizes) != x.shape[0]:
            raise ValueError(f"sizes must give one row count per group ({w.shape[0]}) summing to the rows of x "
                             f"({x.shape[0]}), got {sizes}")
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        out = x.new_empty(x.shape[0], w.shape[2])
        for g, (x_g, out_g) in enumerate(zip(x.split(sizes), out.split(sizes))):
            torch.mm(x_g, w[g], out=out_g)
        return out

    @staticmethod
    @once_differentiable  # backward writes with out=, which autograd cannot differentiate again
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(w) if need_w else None
        x_rows, grad_rows = x.split(ctx.sizes), grad.split(ctx.sizes)
        grad_x_rows = grad_x.split(ctx.sizes) if need_x else None
        for g in range(len(ctx.sizes)):
            if need_w:
                torch.mm(x_rows[g].t(), grad_rows[g], out=grad_w[g])  # dW = Xᵀ·dY (zeros for a group with no rows)
            if need_x:
                torch.mm(grad_rows[g], w[g].t(), out=grad_x_rows[g])  # dX = dY·Wᵀ
        return grad_x, grad_w, None


class GroupedExperts(ExpertBank):
    """One grouped GEMM per weight matrix over all experts' rows, no padding; `.path` says how it ran."""

    # Use torch._grouped_mm even where only its slow reference kernel exists (a CPU, fp32):
    # the tests set it so the grouped path itself is checked on machines without a Hopper GPU.
    use_reference_kernel = False

    def __init__(self, cfg: MoEConfig, experts: range, ffn_slice: slice | None = None):
        super().__init__(cfg, experts, ffn_slice)
        self.path = "not run yet"

    def forward(self, x_MH: torch.Tensor, counts_L: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        ok, why = grouped_mm_support(x_MH.device, x_MH.dtype, self.cfg, reference_ok=self.use_reference_kernel,
                                     ffn_dim=self.ffn_slice.stop - self.ffn_slice.start)
        if ok:
            self.path = why
            offs = torch.cumsum(counts_L, 0).to(torch.int32)  # end row of each group; no host sync

            def mm(a, w):
                return torch._grouped_mm(a, w, offs=offs)
        else:
            sizes = counts_L.tolist() if sizes is None else sizes  # the loop needs them on the host
            if sizes and len(set(sizes)) == 1:  # lesson 05's static shapes: one bmm, no padding
                self.path = f"bmm of equal groups: {why}"
                return self._equal_groups(x_MH, sizes[0])
            self.path = f"grouped GEMM as a loop of mm: {why}"

            def mm(a, w):
                return LoopedGroupedMM.apply(a, w, sizes)

        w_in, w2 = self.weights()
        return mm(activate(mm(x_MH, w_in), self.cfg.activation), w2)

    def _equal_groups(self, x_MH: torch.Tensor, m: int) -> torch.Tensor:
        """A grouped GEMM whose groups all have m rows is a batched GEMM: [L, m, H] is a view of x_MH, no padding."""
        x_LmH = x_MH.reshape(self.num_local_experts, m, x_MH.shape[1])
        w_in, w2 = self.weights()
        y = torch.bmm(activate(torch.bmm(x_LmH, w_in), self.cfg.activation), w2)
        return y.reshape(x_MH.shape)
