"""Skinny GEMMs for a decode step: y = x W^T with x [m, k], m a handful of rows, W [n, k].

Why: at decode each GEMM reads its whole weight once, so its time is weight bytes / HBM
bandwidth. At a handful of rows cuBLAS (through torch or TE: the same kernels) streams the 7B
MLP's fc1 at 79-80% of an H200's 4.8 TB/s, fc2 at 71-72% and the output layer at 87-88%; this
kernel streams them at 86-87%, 76-77% and 92-93% (benchmarks/bench_decode_gemm.py --sweep, 1-16
rows), 0.24-0.28 ms of a 7B decode step. Every program owns a [BLOCK_N] slice of the output
columns and a range of k (split-K where the GEMM is narrow, so every SM has a few programs); it
streams its weight tile once, multiplies it by all rows of x, and writes fp32 partial sums that
a second kernel adds in a fixed order (deterministic) and rounds once. With one split the first
kernel writes the output itself. Where cuBLAS is as fast (the square QKV and attention-output
GEMMs, and every GEMM at 64 rows) `gemm` leaves it to cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_latent.ops.decode_attention import sm_count, tl, triton

MAX_ROWS = 16  # past this cuBLAS's tiles win (measured at 64 rows)


@dataclass(frozen=True)
class Tiling:
    block_n: int = 64  # output columns a program owns
    block_k: int = 128  # k per pipelined load
    splits: int = 1  # ranges of k, each summed by its own programs
    stages: int = 3  # loads in flight
    warps: int = 4


if triton is not None:

    @triton.jit
    def _partial(X, W, P, M, N, sxm, swn, sps, spm, K_BLOCKS, PER_SPLIT: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """Program (n tile, split, m tile): sum over its k blocks of x W^T."""
        pn, ps, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for i in range(0, PER_SPLIT):
            kb = ps * PER_SPLIT + i
            k = kb * BLOCK_K + rk
            if EVEN:  # n and k tile exactly (checked by `fits`); the last split is full
                x = tl.load(X + rm[:, None] * sxm + k[None, :], mask=rm[:, None] < M, other=0.0)
                w = tl.load(W + rn[:, None] * swn + k[None, :])
            else:  # the last split is short: its surplus blocks load zeros
                x = tl.load(X + rm[:, None] * sxm + k[None, :],
                            mask=(rm[:, None] < M) & (kb < K_BLOCKS), other=0.0)
                w = tl.load(W + rn[:, None] * swn + k[None, :], mask=kb < K_BLOCKS, other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        tl.store(P + ps * sps + rm[:, None] * spm + rn[None, :],
                 acc.to(P.dtype.element_ty), mask=rm[:, None] < M)

    @triton.jit
    def _sum_splits(P, Y, total, sps, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = i < total
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(0, SPLITS):
            acc += tl.load(P + s * sps + i, mask=inside, other=0.0)
        tl.store(Y + i, acc.to(Y.dtype.element_ty), mask=inside)


def fits(x: torch.Tensor, weight: torch.Tensor, tiling: Tiling) -> bool:
    """Shapes the kernel takes without masks on the weight: n and k whole tiles."""
    n, k = weight.shape
    return (triton is not None and weight.stride(-1) == 1 and n % tiling.block_n == 0
            and k % tiling.block_k == 0 and x.shape[-1] == k)


def linear(x: torch.Tensor, weight: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """x [..., k] W^T -> [..., n] in x's dtype, fp32 accumulation."""
    if not fits(x, weight, tiling):
        raise ValueError(f"decode GEMM: weight {tuple(weight.shape)} and x "
                         f"{tuple(x.shape)} do not tile by {tiling}")
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    k_blocks = k // tiling.block_k
    per = -(-k_blocks // tiling.splits)
    splits = -(-k_blocks // per)  # rounding `per` up can leave fewer ranges
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    block_m = max(16, triton.next_power_of_2(m)) if m <= 64 else 64
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (n // tiling.block_n, splits, -(-m // block_m))
    _partial[grid](rows, weight, part, m, n, rows.stride(0), weight.stride(0),
                   part.stride(0) if splits > 1 else 0, n, k_blocks, per,
                   EVEN=k_blocks % per == 0, BLOCK_M=block_m, BLOCK_N=tiling.block_n,
                   BLOCK_K=tiling.block_k, PRECISION=precision, num_stages=tiling.stages,
                   num_warps=tiling.warps)
    if splits > 1:
        block = 1024
        _sum_splits[(-(-m * n // block),)](part, y, m * n, part.stride(0), SPLITS=splits,
                                           BLOCK=block)
    return y.view(*x.shape[:-1], n)


def tiling_for(m: int, n: int, k: int, sms: int) -> Tiling | None:
    """Our kernel's tiling for an [m, k] x [k, n] GEMM where it beats cuBLAS, else None.

    Measured on an H200 for the 7B decode GEMMs (bench_decode_gemm.py --sweep): at <= 16 rows
    the wide ones (MLP fc1, the output layer) and the deep one (fc2) stream 4-8% faster than
    cuBLAS; the square ones (QKV, attention output) and every GEMM at 64 rows do not."""
    if m > MAX_ROWS:
        return None
    if n >= 4 * k:  # wide: enough column tiles to fill the GPU without splitting k
        t = Tiling(block_n=128 if n >= 64 * 1024 else 64, block_k=128, splits=1, stages=3)
    elif k >= 4 * n:  # deep: few column tiles, so k is split for ~4 programs an SM
        t = Tiling(block_n=32, block_k=128, splits=max(1, round(4 * sms * 32 / n)), stages=3)
    else:
        return None
    return t if n % t.block_n == 0 and k % t.block_k == 0 else None


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., k] W^T for a decode step: our kernel where `tiling_for` picks one (on a GPU
    with Triton), else torch's cuBLAS GEMM."""
    n, k = weight.shape
    m = x.numel() // k
    if triton is None or not x.is_cuda or x.dtype != weight.dtype:
        return F.linear(x, weight)
    t = tiling_for(m, n, k, sm_count(x))
    return F.linear(x, weight) if t is None or not fits(x, weight, t) else linear(x, weight, t)
