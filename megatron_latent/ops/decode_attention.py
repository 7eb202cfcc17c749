"""Split-K ("flash decoding") attention for one decode step over the static KV cache.

Why: a decode step gives each KV group `r` query rows (the group's query heads) against up to a
few thousand cached keys. SDPA's fused kernels tile queries by 64 rows, so a step launches one
block per (sequence, group) that walks all keys alone: 32 blocks on a 132-SM GPU at batch 8
(measured: ~20 us a layer, 10% of a 7B decode step). Here each (sequence, group) is split over
the key axis into chunks processed in parallel, each chunk leaving its unnormalised output and
softmax statistics; a second small kernel merges the chunks. Shapes depend only on the cache,
so both kernels replay inside the decode CUDA graph.

Layout (kv_cache.py): q [b, g, r, d] (any strides, last one 1); kv [b, g, L, 2, d] with keys at
[..., 0, :] and values at [..., 1, :]; mask [b, L] bool (key visible). Output [b, g, r, d].
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check `available()`
    triton = tl = None

BLOCK_N = 64  # keys per inner tile


def _head_dim_ok(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0  # tl.arange and tl.dot want a power of two >= 16


def available(q: torch.Tensor, head_dim: int | None = None) -> bool:
    """Triton present, q on a GPU (or Triton's CPU interpreter on, as the tests run it) and a
    head size (q's last dimension unless given) the kernel takes: otherwise callers use SDPA."""
    return (triton is not None and _head_dim_ok(head_dim or q.shape[-1])
            and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


if triton is not None:

    @triton.jit
    def _chunk(Q, KV, M, O, ML, sq_b, sq_g, sq_r, skv_b, skv_g, skv_n, skv_t, sm_b,
               so_bg, so_s, so_r, sml_bg, sml_s, G, R, N, qk_scale, CHUNK: tl.constexpr,
               R_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
               PRECISION: tl.constexpr):
        """One (sequence, group, chunk): online softmax over the chunk's keys (log2 domain)."""
        bg, split = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        rows, cols = tl.arange(0, R_PAD), tl.arange(0, D)
        q = tl.load(Q + b * sq_b + g * sq_g + rows[:, None] * sq_r + cols[None, :],
                    mask=rows[:, None] < R, other=0.0)
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D], tl.float32)
        base = KV + b * skv_b + g * skv_g
        for off in range(0, CHUNK, BLOCK):
            n = split * CHUNK + off + tl.arange(0, BLOCK)
            inside = n < N
            visible = tl.load(M + b * sm_b + n, mask=inside, other=0) != 0
            k = tl.load(base + n[:, None] * skv_n + cols[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s = tl.where(visible[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(base + skv_t + n[:, None] * skv_n + cols[None, :], mask=inside[:, None],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        keep = rows < R
        tl.store(O + bg * so_bg + split * so_s + rows[:, None] * so_r + cols[None, :], acc,
                 mask=keep[:, None])
        tl.store(ML + bg * sml_bg + split * sml_s + rows, m_i, mask=keep)
        tl.store(ML + bg * sml_bg + split * sml_s + R_PAD + rows, l_i, mask=keep)

    @triton.jit
    def _merge(O, ML, OUT, so_bg, so_s, so_r, sml_bg, sml_s, R, SPLITS: tl.constexpr,
               R_PAD: tl.constexpr, D: tl.constexpr):
        """One (sequence, group): rescale each chunk to the common maximum and normalise."""
        bg = tl.program_id(0)
        rows, cols = tl.arange(0, R_PAD), tl.arange(0, D)
        keep = rows < R
        m_all = tl.full([R_PAD], float("-inf"), tl.float32)
        for s in range(0, SPLITS):
            m = tl.load(ML + bg * sml_bg + s * sml_s + rows, mask=keep, other=float("-inf"))
            m_all = tl.maximum(m_all, m)
        m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
        num = tl.zeros([R_PAD, D], tl.float32)
        den = tl.zeros([R_PAD], tl.float32)
        for s in range(0, SPLITS):
            m = tl.load(ML + bg * sml_bg + s * sml_s + rows, mask=keep, other=float("-inf"))
            w = tl.exp2(m - m_ref)
            den += w * tl.load(ML + bg * sml_bg + s * sml_s + R_PAD + rows, mask=keep, other=0.0)
            o = tl.load(O + bg * so_bg + s * so_s + rows[:, None] * so_r + cols[None, :],
                        mask=keep[:, None], other=0.0)
            num += w[:, None] * o
        out = num / den[:, None]
        tl.store(OUT + bg * R * D + rows[:, None] * D + cols[None, :],
                 out.to(OUT.dtype.element_ty), mask=keep[:, None])


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of `t`'s GPU (8 off a GPU: Triton's CPU interpreter, tests)."""
    if not t.is_cuda:
        return 8
    return _sms(torch.cuda.current_device() if t.device.index is None else t.device.index)


def splits_for(batch_groups: int, length: int, sms: int) -> int:
    """Chunks per (sequence, group): about two blocks per SM in all, at least one tile each."""
    tiles = -(-length // BLOCK_N)
    return max(1, min(tiles, -(-2 * sms // batch_groups)))


def decode_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float,
                     splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, keys where `mask`) v per (sequence, group): [b, g, r, d]."""
    b, g, r, d = q.shape
    n = kv.shape[2]
    if not _head_dim_ok(d):
        raise ValueError(f"split-K decode attention needs a power-of-two head_dim >= 16, got {d}")
    if kv.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the KV buffer need a contiguous last dimension")
    if splits is None:
        splits = splits_for(b * g, n, sm_count(q))
    per = -(-n // splits)
    chunk = -(-per // BLOCK_N) * BLOCK_N  # keys per chunk, whole tiles
    splits = -(-n // chunk)  # rounding up the chunk can leave fewer chunks
    r_pad = max(16, triton.next_power_of_2(r))
    part = torch.empty(b * g, splits, r_pad, d, dtype=torch.float32, device=q.device)
    stats = torch.empty(b * g, splits, 2 * r_pad, dtype=torch.float32, device=q.device)
    out = torch.empty(b, g, r, d, dtype=q.dtype, device=q.device)
    m = mask.reshape(b, -1)
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    # fp32 (tests): exact products, not TF32; ignored for bf16 inputs
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _chunk[(b * g, splits)](
        q, kv, m, part, stats, q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
        kv.stride(2), kv.stride(3), m.stride(0), part.stride(0), part.stride(1), part.stride(2),
        stats.stride(0), stats.stride(1), g, r, n, scale * 1.4426950408889634, CHUNK=chunk,
        R_PAD=r_pad, D=d, BLOCK=BLOCK_N, PRECISION=precision)
    _merge[(b * g,)](part, stats, out, part.stride(0), part.stride(1), part.stride(2),
                     stats.stride(0), stats.stride(1), r, SPLITS=splits, R_PAD=r_pad, D=d)
    return out
