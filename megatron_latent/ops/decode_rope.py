"""One decode step's RoPE and KV-cache write as one kernel.

Why: at decode the eager form is four small kernels a layer (x * cos, roll, addcmul over all
heads of a group, then an index copy of the key and value into the cache), ~11 us of a 7B layer
at batch 8 on an H200, ~0.3 ms of a 5.3 ms step (profile of bench_generate). Here one program per
(sequence, KV group) reads the group's r query heads, its key and its value once, rotates the
queries and the key in fp32 (one rounding, where the eager form rounds after each op), writes the
key and value into the cache slot `index` and the queries to a [b, g, r, d] buffer for the
split-K attention kernel. Shapes are fixed and the slot is read on the device: it replays in the
decode CUDA graph.

Layout: heads [b, g, r + 2, d] (queries, key, value; last stride 1); angles as cos [b, d] and
signed sin [b, d] (rotate_half's sign folded in: -sin on the first half), fp32; kv [b, g, L, 2, d]
(kv_cache.py).
"""

from __future__ import annotations

import torch

from megatron_latent.ops.decode_attention import tl, triton

if triton is not None:

    @triton.jit
    def _rope_write(X, BIAS, COS, SIN, KV, Q, IDX, sx_b, sx_g, sx_h, sc_b, skv_b, skv_g,
                    skv_n, skv_t, sq_b, sq_g, sq_r, G, R: tl.constexpr, D: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        bg = tl.program_id(0)
        b, g = bg // G, bg % G
        cols = tl.arange(0, D)
        rot = (cols + D // 2) % D  # rotate_half(x)[j] = sign_j * x[(j + d/2) % d]
        cos = tl.load(COS + b * sc_b + cols)
        sin = tl.load(SIN + b * sc_b + cols)
        base = X + b * sx_b + g * sx_g
        bias = BIAS + g * (R + 2) * D  # the group's slice of the projection's bias
        for h in tl.static_range(0, R + 2):  # unrolled: h is known when compiling
            x = tl.load(base + h * sx_h + cols).to(tl.float32)
            xr = tl.load(base + h * sx_h + rot).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias + h * D + cols).to(tl.float32)
                xr += tl.load(bias + h * D + rot).to(tl.float32)
            y = x * cos + xr * sin
            if h < R:
                tl.store(Q + b * sq_b + g * sq_g + h * sq_r + cols, y.to(Q.dtype.element_ty))
            else:
                # the key (rotated) and the value (as is) into the cache slot
                out = y if h == R else x
                slot = KV + b * skv_b + g * skv_g + tl.load(IDX) * skv_n + (h - R) * skv_t
                tl.store(slot + cols, out.to(KV.dtype.element_ty))


def cos_signed_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin with rotate_half's sign folded in: -sin on the first half of the last dim):
    RoPE is then x * cos + roll(x, d/2) * signed_sin."""
    half = angles.shape[-1] // 2
    sin = angles.sin()
    return angles.cos(), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope_rows(freqs: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) [b, d] in fp32 from one decode step's angles [1, b or 1, 1, d]."""
    cos, sin = cos_signed_sin(freqs[0, :, 0].float().expand(b, -1))
    return cos.contiguous(), sin.contiguous()


def rope_write(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor,
               index: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the queries and the key of `heads` [b, g, r + 2, d] (plus the projection's
    `bias` [g * (r + 2) * d] when given: the GEMM then runs without its bias epilogue), write
    the key and value to `kv[:, :, index]`; returns the rotated queries [b, g, r, d]."""
    b, g, n, d = heads.shape
    r = n - 2
    if heads.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("heads and the KV buffer need a contiguous last dimension")
    q = torch.empty(b, g, r, d, dtype=heads.dtype, device=heads.device)
    _rope_write[(b * g,)](heads, heads if bias is None else bias, cos, sin, kv, q, index,
                          heads.stride(0), heads.stride(1), heads.stride(2), cos.stride(0),
                          kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), q.stride(0),
                          q.stride(1), q.stride(2), g, R=r, D=d, HAS_BIAS=bias is not None)
    return q
