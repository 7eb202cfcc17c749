"""One training step through megatron-core's pipeline schedules, with token-sum losses.

A micro-batch is a dict: input_ids [b, s], labels [b, s] (already shifted: labels[t] is the token
at t+1), loss_mask [b, s], pixel_values, image_grid_thw, position_ids [3, b, s]. Every micro-batch
of a step has the same s (the pipeline sends fixed-shape activations).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func



def _to_device(batch: dict) -> dict:
    dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_sum_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron loss_func contract with calculate_per_token_loss: (sum, n_tokens, logs)."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    n = mask.sum()
    return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n.detach()])}


def lm_forward_step(data_iterator, model):
    batch = _to_device(next(data_iterator))
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                labels=batch["labels"])
    return out, partial(token_sum_loss, batch["loss_mask"])


def _run_schedule(model_chunks, micro_batches: list[dict], forward_step: Callable,
                  forward_only: bool):
    seq = micro_batches[0]["input_ids"].shape[1]
    mbs = micro_batches[0]["input_ids"].shape[0]
    if any(mb["input_ids"].shape != (mbs, seq) for mb in micro_batches):
        raise ValueError("all micro-batches of a step must have the same [batch, seq] shape; "
                         f"got {[tuple(mb['input_ids'].shape) for mb in micro_batches]}")
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model_chunks,
        num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=mbs,
        forward_only=forward_only)


def _reduce_logs(losses: list[dict], key: str = "lm loss") -> float | None:
    """Token-mean loss over all micro-batches and data-parallel ranks (last stage only)."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    pair = torch.stack([d[key] for d in losses]).sum(0)
    torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    return (pair[0] / pair[1].clamp(min=1)).item()


def train_step(model_chunks, optimizer, micro_batches: list[dict],
               forward_step: Callable = lm_forward_step) -> dict:
    """Zero grads, forward/backward all micro-batches, optimizer step. Returns logs; `loss` is
    broadcast from the last pipeline stage so every rank sees it."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    loss = _broadcast_from_last_stage(_reduce_logs(losses))
    return {"loss": loss, "grad_norm": grad_norm, "update_ok": ok}


@torch.no_grad()
def eval_loss(model_chunks, micro_batches: list[dict],
              forward_step: Callable = lm_forward_step) -> float:
    for chunk in model_chunks:
        chunk.eval()
    try:
        losses = _run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return _broadcast_from_last_stage(_reduce_logs(losses))


def _broadcast_from_last_stage(value: float | None) -> float:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    t = torch.tensor([value if value is not None else 0.0], dtype=torch.float64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return t.item()


@torch.no_grad()
def full_logits(model_chunks, batch: dict) -> torch.Tensor | None:
    """Logits [b, s, vocab] gathered over TP, on the last pipeline stage (None elsewhere).
    Forward-only through the pipeline schedule; used by tests and tools that compare models."""
    captured = []

    def step(data_iterator, model):
        b = _to_device(next(data_iterator))
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                    pixel_values=b.get("pixel_values"), image_grid_thw=b.get("image_grid_thw"),
                    runtime_gather_output=True)

        def keep(logits):
            captured.append(logits.detach())
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, keep

    for chunk in model_chunks:
        chunk.eval()
    _run_schedule(model_chunks, [batch], step, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    return captured[0] if captured else None
