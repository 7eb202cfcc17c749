"""Pipeline plumbing for generation: hidden states go forward stage to stage; the sampled ids,
feed mask and hidden states (the pending latent) come back from the last stage every step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


class StageLink:
    def __init__(self, model, device):
        self.model, self.device = model, device
        self.first, self.last = model.pre_process, model.post_process
        self.single_stage = self.first and self.last
        self.dtype, self.hidden = model.config.params_dtype, model.config.hidden_size
        if not self.single_stage:
            self.group = ps.get_pipeline_model_parallel_group()
            self.prev = ps.get_pipeline_model_parallel_prev_rank()
            self.next = ps.get_pipeline_model_parallel_next_rank()
            self.last_rank = ps.get_pipeline_model_parallel_last_rank()

    def forward(self, run, seq_len: int, batch: int):
        """Run this stage's part of a forward; the last stage returns the head's output."""
        if not self.first:
            x = torch.empty(seq_len, batch, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.prev, group=self.group)
            self.model.set_input_tensor(x)
        out = run()
        if self.last:
            return out
        dist.send(out.contiguous(), dst=self.next, group=self.group)
        return None

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        assert t.is_contiguous()
        dist.broadcast(t, src=self.last_rank, group=self.group)
        return t

    def from_last(self, ids, feed, hidden, b: int, h: int):
        if self.single_stage:
            return ids, feed, hidden
        if not self.last:
            ids = torch.empty(b, dtype=torch.long, device=self.device)
            feed = torch.empty(b, dtype=torch.long, device=self.device)
            hidden = torch.empty(b, h, dtype=self.dtype, device=self.device)
        ids = self._bcast(ids.contiguous())  # column views of the records are strided
        feed = self._bcast(feed.long()).bool()  # bool is not a wire type everywhere (gloo)
        hidden = self._bcast(hidden.to(self.dtype).contiguous())
        return ids, feed, hidden

    def offsets_from_last(self, offsets, b: int) -> torch.Tensor:
        """The decode program's [3, b] position offsets, on every stage."""
        if self.single_stage:
            return offsets
        if not self.last:
            offsets = torch.empty(3, b, dtype=torch.long, device=self.device)
        return self._bcast(offsets.long().contiguous())

    def all_finished(self, finished: torch.Tensor) -> bool:
        flag = finished.all().long().reshape(1)
        if not self.single_stage:
            flag = self._bcast(flag)
        return bool(flag.item())

    def share_records(self, rec: dict) -> dict:
        """Every stage gets the last stage's records (RL needs tokens and latents everywhere)."""
        if self.single_stage:
            return rec
        out = {}
        for k, v in rec.items():
            wire = v.long() if v.dtype == torch.bool else v.contiguous()
            out[k] = self._bcast(wire).to(v.dtype)
        return out
