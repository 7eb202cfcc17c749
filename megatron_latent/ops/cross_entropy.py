"""Vocab-parallel cross entropy in two Triton kernels, with no fp32 copy of the logits.

Why: megatron-core's "native" fused CE casts the [s, b, v] logits to fp32, exponentiates in place
and keeps that softmax for backward: for 4096 x 152064 bf16 logits that is 2.5 GB more memory
and several full passes. TE's fused CE avoids the copy but needs Transformer Engine. Here the
forward reads the logits once, the backward reads them once and writes the gradient once, and
only a few numbers per row are kept. Measured on an H200 (4096 x 152064 bf16, forward +
backward): 1.05 ms and +1.16 GiB peak (the gradient) vs native 7.5 ms and +5.9 GiB.

Math, per row x (one (s, b) position) over this rank's vocab shard of size V:
  forward:  m = max x, S = sum exp(x - m) (online, chunk by chunk), lse = m + log S,
            loss = log S - (x[target] - m) = lse - x[target]; as in megatron, the shifted
            x[target] - m is taken as 0 where no rank owns the target (e.g. -100): loss = log S;
  backward: dL/dx = (exp(x - lse) - onehot(target)) * grad_out.
Tensor parallel (rank r owns ids [r V, (r + 1) V)): all-reduce MAX of m; each rank rescales its
S to the global max, S * exp(m - m_global); one all-reduce SUM of [S, x[target] - m] stacked.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check `available()`
    triton = tl = None

BLOCK = 4096  # vocab entries per loop step; tests lower it to exercise many chunks and a tail
NUM_WARPS = 8


def available(device: torch.device | str) -> bool:
    """Triton present and the device a GPU (or Triton's CPU interpreter on, as tests run it)."""
    on_gpu = torch.device(device).type == "cuda"
    return triton is not None and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _forward(X, T, STATS, stride_s, stride_b, B, V_LOCAL: tl.constexpr, BLOCK: tl.constexpr):
        """One row: its max, sum of exp(x - max) and target logit (0 if not local) -> STATS."""
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31
        x_row = X + (row // B) * stride_s + (row % B) * stride_b
        # a finite start: with -inf, a first chunk of -inf logits (a masked vocab shard; bf16's
        # minimum divided by T < 1) would give exp(-inf + inf) = NaN for the whole row
        m = tl.full([], -3.4028234663852886e38, tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, V_LOCAL, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < V_LOCAL, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        t = tl.load(T + row)
        picked = tl.load(x_row + t, mask=t >= 0, other=0.0).to(tl.float32)
        tl.store(STATS + row, m)
        tl.store(STATS + row + tl.num_programs(0), s)
        tl.store(STATS + row + 2 * tl.num_programs(0), picked)

    @triton.jit
    def _backward(X, G, T, LSE, DY, sx_s, sx_b, sg_s, sg_b, B, V_LOCAL: tl.constexpr,
                  BLOCK: tl.constexpr):
        """One row: G = (softmax(x) - onehot(target)) * dy, in fp32, stored in G's dtype."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + (row // B) * sx_s + (row % B) * sx_b
        g_row = G + (row // B) * sg_s + (row % B) * sg_b
        lse, dy, t = tl.load(LSE + row), tl.load(DY + row), tl.load(T + row)
        for start in range(0, V_LOCAL, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V_LOCAL
            x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(g_row + cols, (g * dy).to(G.dtype.element_ty), mask=inside)


def _tp(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in the TP group; None means no tensor parallelism."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _CrossEntropy(torch.autograd.Function):
    """logits [s, b, v_local], target [s, b] -> loss [s, b] fp32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        s, b, v = logits.shape
        rank, size = _tp(group)
        local = target.reshape(-1) - rank * v
        local = torch.where((local >= 0) & (local < v), local, -1)
        stats = torch.empty(3, s * b, dtype=torch.float32, device=logits.device)
        _forward[(s * b,)](logits, local, stats, logits.stride(0), logits.stride(1), b,
                           V_LOCAL=v, BLOCK=min(BLOCK, triton.next_power_of_2(v)),
                           num_warps=NUM_WARPS)
        m, sum_exp, picked = stats
        if size > 1:
            m_all = m.clone()
            dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
            sum_exp = sum_exp * torch.exp(m - m_all)
            m = m_all
        # as megatron: the target logit relative to the max, 0 where no rank owns the target
        picked = torch.where(local >= 0, picked - m, 0.0)
        if size > 1:
            both = torch.stack([sum_exp, picked])
            dist.all_reduce(both, group=group)  # one collective for both sums
            sum_exp, picked = both
        log_sum = torch.log(sum_exp)
        ctx.save_for_backward(logits, local, m + log_sum)  # the logits themselves: no copy
        return (log_sum - picked).view(s, b)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, local, lse = ctx.saved_tensors
        s, b, v = logits.shape
        dy = grad_out.reshape(-1).float().contiguous()  # any strides (e.g. expanded ones)
        grad = torch.empty_like(logits)  # keeps a dense layout, so no copy downstream
        _backward[(s * b,)](logits, grad, local, lse, dy, logits.stride(0), logits.stride(1),
                            grad.stride(0), grad.stride(1), b, V_LOCAL=v,
                            BLOCK=min(BLOCK, triton.next_power_of_2(v)), num_warps=NUM_WARPS)
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token CE: logits [s, b, v_local] (bf16/fp32, last dim contiguous), labels [b, s] ->
    loss [b, s] fp32, as LanguageModule.compute_language_model_loss. tp_group=None: one rank."""
    return _CrossEntropy.apply(logits, labels.t(), tp_group).t().contiguous()
