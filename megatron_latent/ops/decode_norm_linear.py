"""A decode step's norm + projection (the QKV projection and MLP fc1: TE's LayerNormLinear)
without TE's general RMSNorm kernel and its bias epilogue.

Why: at decode TE's LayerNormLinear runs its general RMSNorm kernel (5.0 us for 8 rows of 3,584
on an H200) and a GEMM whose bias epilogue picks a slower kernel (11.1 us against 7.5 us
without bias at the 7B QKV shape, benchmarks/bench_decode_gemm.py and a profile of
bench_generate). Here: one Triton RMSNorm (one program per row, fp32 statistics as TE), the
GEMM without bias (decode_gemm.py: cuBLAS, the kernels TE picks, or ours where faster), and
the bias returned to the caller's next kernel (QKV's: the RoPE kernel, decode_rope.py). The
state dict is TE's own module's.
"""

from __future__ import annotations

import torch

from megatron_latent.ops import fp8_gemm
from megatron_latent.ops.decode_attention import tl, triton

if triton is not None:

    @triton.jit
    def _rms_norm(X, W, Y, sx, sy, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(X + row * sx + cols, mask=inside, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (x * inv * w).to(Y.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension, in fp32, one kernel."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty_like(rows)
    n = rows.shape[-1]
    _rms_norm[(rows.shape[0],)](rows, weight, y, rows.stride(0), y.stride(0), n, eps,
                                BLOCK=triton.next_power_of_2(n))
    return y.view(x.shape)


def fusable(linear) -> bool:
    """TE's LayerNormLinear with RMSNorm, a plain bf16/fp32 weight (not fp8), column-parallel
    without sequence parallelism, its bias (if any) added to its output."""
    return (triton is not None and getattr(linear, "normalization", None) == "RMSNorm"
            and hasattr(linear, "layer_norm_weight") and not linear.zero_centered_gamma
            and not linear.return_layernorm_output and linear.parallel_mode == "column"
            and not linear.sequence_parallel and type(linear.weight) is torch.nn.Parameter
            and linear.weight.dtype in (torch.bfloat16, torch.float32)
            and (not linear.use_bias or linear.apply_bias))


def project(linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x) W^T without the bias, the bias or None) of a `fusable` module (W its FP8 copy
    during an FP8 rollout)."""
    mixed = fp8_gemm.module_gemm(linear, rms_norm(x, linear.layer_norm_weight, linear.eps))
    return mixed, (linear.bias if linear.use_bias else None)
