"""FP8 (e4m3) GEMMs for rollouts: y = x W^T with W per output channel and x per token (row)
scaled into e4m3's range (+-448), accumulated in fp32 (vLLM's "fp8 dynamic" scheme).

Why: a decode step streams every weight once, so its time is weight bytes / HBM bandwidth; e4m3
weights halve the bytes. Per-channel and per-token scales keep one outlier from flattening a
whole tensor's precision. On a GPU with FP8 tensor cores (sm_89+) the GEMM is cuBLAS's
row-wise-scaled `torch._scaled_mm`; elsewhere (CPU tests) the same quantized operands are
dequantized and multiplied in fp32, so both paths compute the same function up to summation
order. The activation's quantization is one Triton kernel per GEMM on a GPU (several torch
kernels otherwise: at decode, launch count matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_latent.ops import decode_gemm
from megatron_latent.ops.decode_attention import tl, triton

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
ATTR = "rollout_fp8"  # the attribute a linear module carries its Fp8Weight under


@dataclass
class Fp8Weight:
    data: torch.Tensor  # [n, k] e4m3
    scale: torch.Tensor  # [n] fp32: W ~ data * scale[:, None]

    @classmethod
    def empty_like(cls, weight: torch.Tensor) -> "Fp8Weight":
        n = weight.shape[0]
        return cls(torch.empty(weight.shape, dtype=FP8, device=weight.device),
                   torch.empty(n, dtype=torch.float32, device=weight.device))

    def quantize_(self, weight: torch.Tensor) -> "Fp8Weight":
        """Quantize `weight` into these buffers in place (CUDA graphs keep their addresses)."""
        data, scale = quantize_rows(weight.detach())
        self.data.copy_(data)
        self.scale.copy_(scale)
        return self


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [r, c], fp32 scales [r]) with t ~ q * scale[:, None]: each row's absolute maximum
    maps to 448 (an all-zero row gets scale 1 and stays zero)."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.is_cuda and triton is not None and rows.dtype in (torch.bfloat16, torch.float16,
                                                              torch.float32):
        return _quantize_rows_triton(rows)
    amax = rows.abs().amax(-1).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (rows.float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, scale


if triton is not None:

    @triton.jit
    def _quantize(X, Q, S, sx, sq, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(X + row * sx + cols, mask=inside, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 0)
        scale = tl.where(amax > 0, amax / 448.0, 1.0)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(Q + row * sq + cols, q.to(Q.dtype.element_ty), mask=inside)
        tl.store(S + row, scale)


def _quantize_rows_triton(rows: torch.Tensor):
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape
    q = torch.empty(m, n, dtype=FP8, device=rows.device)
    s = torch.empty(m, dtype=torch.float32, device=rows.device)
    if m:
        _quantize[(m,)](rows, q, s, rows.stride(0), q.stride(0), n,
                        BLOCK=triton.next_power_of_2(n))
    return q, s


def native(device: torch.device) -> bool:
    """cuBLAS's row-wise-scaled FP8 GEMM runs here (FP8 tensor cores: sm_89 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., k] W^T (+ bias) -> [..., n] in x's dtype, x quantized per row."""
    n, k = w.data.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8 linear: input {tuple(x.shape)} does not match weight [{n}, {k}]")
    xq, xs = quantize_rows(x)
    if native(x.device) and k % 16 == 0 and n % 16 == 0:
        y = torch._scaled_mm(xq, w.data.t(), scale_a=xs[:, None], scale_b=w.scale[None, :],
                             out_dtype=torch.bfloat16).to(x.dtype)
    else:
        y = ((xq.float() * xs[:, None]) @ (w.data.float() * w.scale[:, None]).t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], n)


def module_gemm(module, x: torch.Tensor) -> torch.Tensor:
    """x W^T of a linear module for a decode step: its FP8 copy while one is attached (a
    rollout in FP8), else decode_gemm's bf16 GEMM of its weight."""
    q = getattr(module, ATTR, None)
    return linear(x, q) if q is not None else decode_gemm.gemm(x, module.weight)
