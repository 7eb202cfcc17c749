"""One training step through megatron-core's pipeline schedules, with token-sum losses.

A micro-batch is a dict: input_ids [b, s], labels [b, s] (already shifted: labels[t] is the token
at t+1), loss_mask [b, s], pixel_values, image_grid_thw, position_ids [3, b, s], plus what the
latent method reads (LVR: latent_mask, latent_index). Every micro-batch of a step has the same s
(the pipeline sends fixed-shape activations).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_latent import parallel
from megatron_latent.data.packing import packed_seq_params
from megatron_latent.latent import pipeline_channel
from megatron_latent.latent.base import LatentMethod, PlainLM
from megatron_latent.platform import host_copy
from megatron_latent.training.build import unwrap

MODEL_INPUTS = ("input_ids", "position_ids", "pixel_values", "image_grid_thw")
# host bookkeeping: the vision tower reads it on the host (a device copy costs a sync to read)
HOST_KEYS = ("image_grid_thw",)


def _device():
    return parallel.device()


def _to_device(batch: dict) -> dict:
    dev = _device()
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) and k not in HOST_KEYS else v
            for k, v in batch.items()}


def host_token_counts(batch: dict, model) -> tuple[int, int] | None:
    """(image, video) tokens of a host micro-batch's input_ids, for the model's input checks
    (None when input_ids already sit on the GPU: the model then counts them there)."""
    ids = batch["input_ids"]
    return None if ids.is_cuda else unwrap(model).token_counts(ids)


def make_forward_step(method: LatentMethod):
    def forward_step(data_iterator, model):
        host = next(data_iterator)
        batch = _to_device(host)
        step = method.sft_step(batch)
        out = model(**{k: batch.get(k) for k in MODEL_INPUTS}, labels=batch["labels"],
                    latent=step, packed_seq_params=packed_seq_params(batch),
                    token_counts=host_token_counts(host, model))
        return out, partial(_normalized_loss, step, host["step_totals"])

    return forward_step


def _normalized_loss(step, totals: dict, output):
    """The step's token-sum loss divided by the global token count (attach_step_totals: a 0-d
    tensor, summed before the schedule runs): the gradients come out as the global mean's, and
    build.finalize_grads skips megatron's 1/num_tokens pass over every gradient (6 ms of a 7B
    step). The logs stay token sums (the step's reported means divide them)."""
    total, n, logs = step.loss(output)
    return total / totals["ce"].clamp(min=1.0), n, logs


def attach_step_totals(method: LatentMethod, micro_batches: list[dict]) -> None:
    """Count every loss term over all micro-batches and data-parallel ranks (see latent/base).
    The sums stay on the GPU (0-d tensors): copied there from page-locked memory and reduced
    over data-parallel ranks behind the queued work, so the step starts without waiting for
    the GPU."""
    counts = [method.count(mb) for mb in micro_batches]
    keys = sorted(counts[0])
    t = torch.tensor([[c[k] for k in keys] for c in counts], dtype=torch.float32).sum(0)
    t = host_copy.upload(t, _device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    totals = dict(zip(keys, t.unbind()))
    for mb, own in zip(micro_batches, counts):
        mb["step_totals"], mb["counts"] = totals, own  # own: this micro-batch's, on the host


def _run_schedule(model_chunks, micro_batches: list[dict], forward_step, forward_only: bool):
    seq = micro_batches[0]["input_ids"].shape[1]
    mbs = micro_batches[0]["input_ids"].shape[0]
    # the pipeline sends fixed-shape activations; without one, lengths may differ (packing)
    if (parallel_state.get_pipeline_model_parallel_world_size() > 1
            and any(mb["input_ids"].shape != (mbs, seq) for mb in micro_batches)):
        raise ValueError("all micro-batches of a step must have the same [batch, seq] shape; "
                         f"got {[tuple(mb['input_ids'].shape) for mb in micro_batches]}")
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches),
            model=model_chunks, num_microbatches=len(micro_batches), seq_length=seq,
            micro_batch_size=mbs, forward_only=forward_only)
    finally:
        pipeline_channel.finish_sends()


class PendingLogs:
    """A step's logs still on the GPU. The reduction over micro-batches and data-parallel ranks
    is queued; the values come back by an asynchronous copy to page-locked memory, and
    `result()` waits for that copy only (platform/host_copy.py), not for work queued after it:
    a loop that launches step n+1 before reading step n's logs never lets the GPU run dry.
    Under pipeline parallelism `result()` broadcasts from the last stage; every rank calls it
    at the same point of its loop."""

    def __init__(self, method: LatentMethod, logs: list[dict], grad_norm=None,
                 update_ok: bool | None = None):
        self.method, self.update_ok, self.keys = method, update_ok, None
        # terms computed off the head (layer hooks), on whichever stage holds the layer
        stage = method.stage_logs()
        if stage:
            names = sorted(stage)
            t = torch.stack([stage[k].double().to(_device()) for k in names])
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                dist.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
            stage = dict(zip(names, t))
        # the clip's norm is a device tensor with TE's kernels, a host float (or None) without
        self.norm_on_device = torch.is_tensor(grad_norm)
        self.grad_norm = None if self.norm_on_device else grad_norm
        extra = [grad_norm.reshape(1).double()] if self.norm_on_device else []
        if parallel_state.is_pipeline_last_stage():
            self.keys = sorted(logs[0]) + sorted(stage)
            per_mb = torch.stack([torch.stack([d[k] for k in sorted(logs[0])])
                                  for d in logs]).double()
            # a "... max" log is (value, 1): its maximum over micro-batches and ranks
            flags = [k.endswith(" max") for k in sorted(logs[0])]
            is_max = torch.tensor(flags, device=per_mb.device).view(-1, 1)
            pairs = torch.where(is_max, per_mb.max(0).values, per_mb.sum(0))
            if stage:
                pairs = torch.cat([pairs, torch.stack([stage[k] for k in sorted(stage)])])
            group = parallel_state.get_data_parallel_group()
            if any(flags):
                top = torch.where(is_max, pairs[:len(is_max)], -math.inf)
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                pairs[:len(is_max)] = torch.where(is_max, 0.0, pairs[:len(is_max)])
                dist.all_reduce(pairs, group=group)
                pairs[:len(is_max)] = torch.where(is_max, top, pairs[:len(is_max)])
                pairs[:len(is_max), 1] = torch.where(is_max[:, 0], 1.0, pairs[:len(is_max), 1])
            else:
                dist.all_reduce(pairs, group=group)
            extra = [pairs.flatten()] + extra
        self.download = host_copy.Download(torch.cat(extra)) if extra else None

    def result(self) -> dict:
        values = self.download.values().tolist() if self.download is not None else []
        out = None
        if self.norm_on_device:
            self.grad_norm = values.pop()
        if self.keys is not None:
            pairs = [values[2 * i:2 * i + 2] for i in range(len(self.keys))]
            out = {k: p / max(n, 1.0) for k, (p, n) in zip(self.keys, pairs)}
            out["loss"] = self.method.total_loss(out)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [out]
            dist.broadcast_object_list(
                box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
            out = box[0]
        return out


class PendingStep(PendingLogs):
    """A launched training step: `result()` gives its logs with `grad_norm` and `update_ok`,
    and raises if the gradients held a NaN or Inf (the gradient norm is not finite)."""

    def result(self) -> dict:
        out = super().result()
        norm = float(self.grad_norm or 0.0)
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"the gradient norm is {norm}: a NaN or Inf reached the gradients (logs: {out}); "
                "stop and resume from the last checkpoint, with a lower LR or after checking "
                "the data")
        return {**out, "grad_norm": norm, "update_ok": self.update_ok}


def launch_step(model_chunks, optimizer, micro_batches: list[dict],
                method: LatentMethod = PlainLM()) -> PendingStep:
    """Zero grads, forward/backward all micro-batches, optimizer step, all queued on the GPU
    without waiting for it; the logs come later from the returned PendingStep.result()."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    method.prepare_step(model_chunks, micro_batches, forward_outputs)
    attach_step_totals(method, micro_batches)
    logs = _run_schedule(model_chunks, micro_batches, make_forward_step(method), False)
    ok, grad_norm, _ = optimizer.step()
    return PendingStep(method, logs, grad_norm, ok)


def train_step(model_chunks, optimizer, micro_batches: list[dict],
               method: LatentMethod = PlainLM()) -> dict:
    """One step, waited for. Returns the logs (same on every rank): per-term means, `loss`,
    `grad_norm`, `update_ok`."""
    return launch_step(model_chunks, optimizer, micro_batches, method).result()


@torch.no_grad()
def eval_losses(model_chunks, micro_batches: list[dict], method: LatentMethod = PlainLM()) -> dict:
    for chunk in model_chunks:
        chunk.eval()
    try:
        method.prepare_step(model_chunks, micro_batches, forward_outputs)
        attach_step_totals(method, micro_batches)
        logs = _run_schedule(model_chunks, micro_batches, make_forward_step(method), True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return PendingLogs(method, logs).result()


def eval_loss(model_chunks, micro_batches: list[dict], method: LatentMethod = PlainLM()) -> float:
    return eval_losses(model_chunks, micro_batches, method)["loss"]


@torch.no_grad()
def full_logits(model_chunks, batch: dict) -> torch.Tensor | None:
    """Logits [b, s, vocab] gathered over TP, on the last pipeline stage (None elsewhere).
    Forward-only through the pipeline schedule; used by tests and tools that compare models."""
    captured = []

    def step(data_iterator, model):
        b = _to_device(next(data_iterator))
        out = model(**{k: b.get(k) for k in MODEL_INPUTS}, runtime_gather_output=True)

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


@torch.no_grad()
def forward_outputs(model_chunks, micro_batches: list[dict], method: LatentMethod) -> list:
    """Forward-only through the schedule with `method`'s injection and head; the head outputs
    of every micro-batch on the last pipeline stage (an empty list elsewhere)."""
    captured = []

    def step(data_iterator, model):
        batch = _to_device(next(data_iterator))
        latent = method.sft_step(batch)
        out = model(**{k: batch.get(k) for k in MODEL_INPUTS}, labels=batch.get("labels"),
                    latent=latent, packed_seq_params=packed_seq_params(batch))

        def keep(output):
            captured.append(output.detach() if torch.is_tensor(output) else output)
            return torch.zeros((), device=_device()), torch.tensor(1, dtype=torch.int), {}

        return out, keep

    modes = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    try:
        _run_schedule(model_chunks, micro_batches, step, forward_only=True)
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)
    return captured
