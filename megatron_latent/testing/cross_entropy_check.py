"""Checks of the Triton cross entropy (ops/cross_entropy.py) that run under Triton's CPU
interpreter (TRITON_INTERPRET=1 must be set before triton is imported, hence a separate process:
tests/test_cross_entropy.py runs `python -m megatron_latent.testing.cross_entropy_check`).
fp32 only: the interpreter does not model bf16 (tests/gpu/test_cross_entropy_gpu.py covers it).
The oracle is megatron-core's unfused vocab_parallel_cross_entropy on an fp32 copy."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

SMALL_BLOCK = 64  # many vocab chunks and a ragged tail at test sizes


def _labels(b: int, s: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """Random ids in [0, v) with the edges 0 and v - 1 and some ignored (-100) positions."""
    labels = torch.randint(0, v, (b, s), generator=gen)
    flat = labels.view(-1)
    flat[0], flat[-1] = 0, v - 1
    flat[1 % flat.numel()] = -100
    if flat.numel() > 3:
        flat[2] = -100
    return labels


def _logits(s: int, b: int, v: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    """[s, b, v] fp32 logits: contiguous, a transposed [b, s, v] view, a vocab slice, or with
    the first vocab chunk at -inf (a masked shard: the online max must not start at -inf)."""
    if layout == "masked_head":
        x = 3 * torch.randn(s, b, v, generator=gen)
        x[..., :SMALL_BLOCK + 5] = float("-inf")
        return x
    if layout == "transposed":
        return (3 * torch.randn(b, s, v, generator=gen)).transpose(0, 1)
    if layout == "sliced":
        return (3 * torch.randn(s, b, v + 7, generator=gen))[..., 3:v + 3]
    return 3 * torch.randn(s, b, v, generator=gen)


def _oracle(x: torch.Tensor, labels: torch.Tensor, dy: torch.Tensor,
            group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [b, s], dloss/dx) from megatron's unfused op, on a contiguous copy (it views its
    input as 2-D and edits it in place)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ref = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
    loss = vocab_parallel_cross_entropy(ref, labels.t().contiguous(), tp_group=group)
    loss.t().backward(gradient=dy)
    return loss.t().detach(), ref.grad


def _fused(x: torch.Tensor, labels: torch.Tensor, dy: torch.Tensor,
           group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [b, s], dloss/dx) from the Triton op."""
    from megatron_latent.ops import cross_entropy as ce

    ce.BLOCK = SMALL_BLOCK
    leaf = x.detach().requires_grad_()
    loss = ce.vocab_parallel_cross_entropy(leaf, labels, tp_group=group)
    loss.backward(gradient=dy)
    return loss.detach(), leaf.grad


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, with a NaN anywhere counted as infinitely wrong (max() would skip it)."""
    d = (a - b).abs().max().item()
    return d if d == d else float("inf")


def kernel_cases() -> tuple[float, float]:
    """Largest |fused - megatron| of the loss and of the logits gradient over the cases."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    worst_loss = worst_grad = 0.0
    for s, b, v, layout in [(6, 1, 200, "contiguous"), (3, 2, 257, "contiguous"),
                            (2, 3, 300, "transposed"), (3, 2, 250, "sliced"),
                            (2, 3, 64, "contiguous"), (3, 2, 200, "masked_head")]:
        x = _logits(s, b, v, layout, gen)
        labels = _labels(b, s, v, gen)
        if layout == "masked_head":  # targets among the finite logits (else both give inf)
            labels = torch.where(labels >= 0, labels.clamp(min=SMALL_BLOCK + 5), labels)
        dy = torch.rand(s, b, generator=gen).t() * 2 - 0.5  # non-uniform, non-contiguous
        loss, grad = _fused(x, labels, dy)
        ref_loss, ref_grad = _oracle(x, labels, dy, group)
        assert loss.dtype == torch.float32 and loss.shape == (b, s) and grad.shape == x.shape
        worst_loss = max(worst_loss, _diff(loss, ref_loss))
        worst_grad = max(worst_grad, _diff(grad, ref_grad))
    dist.destroy_process_group()
    return worst_loss, worst_grad


def tp2_rank(out: str) -> None:
    """One of two gloo ranks: its vocab half of shared logits vs the whole vocab on one rank;
    writes this rank's (loss diff, grad diff) to `out`.RANK."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1)
    s, b, v_local = 3, 2, 137
    x = 3 * torch.randn(s, b, 2 * v_local, generator=gen)
    labels = _labels(b, s, 2 * v_local, gen)
    labels[0, 1], labels[1, 0] = v_local - 1, v_local  # the last id of rank 0, first of rank 1
    x[2, 1, v_local:] = float("-inf")  # rank 1's whole shard masked for one row
    labels[1, 2] = 5  # that row's target on rank 0
    dy = torch.rand(b, s, generator=gen) * 2 - 0.5
    ref_loss, ref_grad = _fused(x, labels, dy)
    mine = x[..., rank * v_local:(rank + 1) * v_local]  # a strided view of the shared logits
    loss, grad = _fused(mine, labels, dy, group=dist.group.WORLD)
    ref_grad = ref_grad[..., rank * v_local:(rank + 1) * v_local]
    diffs = (_diff(loss, ref_loss), _diff(grad, ref_grad))
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{diffs[0]} {diffs[1]}")


def tp2_case() -> tuple[float, float]:
    """TP=2 over gloo on the CPU: largest (loss, grad) difference from TP=1 over both ranks."""
    from megatron_latent.testing import cross_entropy_check as me  # importable, not __main__
    from megatron_latent.testing.distributed import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "diff")
        run_distributed(me.tp2_rank, 2, out, timeout=300)
        pairs = [tuple(map(float, open(f"{out}.{r}").read().split())) for r in range(2)]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the kernels run in Triton's CPU interpreter)")
    loss_diff, grad_diff = kernel_cases()
    print(f"ce max diff loss {loss_diff:.3e} grad {grad_diff:.3e}", flush=True)
    loss_diff, grad_diff = tp2_case()
    print(f"ce tp2 max diff loss {loss_diff:.3e} grad {grad_diff:.3e}", flush=True)
