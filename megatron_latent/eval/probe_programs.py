"""Ablation decode programs of the latent probe: a method's decode program (latent.decoding) with
what it feeds at latent steps replaced, or its spans cut out.

- `Replaced(program, ...)`: the program decides everything as before (when a span opens, how long
  it runs, what is appended) but the vector fed at a latent step is replaced: by zeros
  (`Zeros`), by one fixed vector (`Fixed`: the evaluation set's mean latent) or by another
  sample's recorded latents (`Bank`: the k-th latent a row feeds is its donor's k-th, counted
  over all its spans, wrapping round the donor's count); one step at a time or in a chunk
  append (a whole block of vectors at once: DeepLatent's grid).
- `CutSpans(program)`: the latents are cut from the context. Every span keeps its opener and the
  token that closed it in the recorded (as generated) run, at the positions they had there, with
  nothing in between (no latents, nor the placeholders a block holds before them); the model
  then continues on its own. So the context differs from the
  recorded one by the latent inputs only (positions included): a model that never reads its
  latents gives the same continuation. A span the continuation opens beyond the recorded ones
  is closed at once (its opener, then the program's end token).
Programs hold per-row banks: `select(items, device)` before each generate call names the
evaluation items of the batch's rows.
"""

from __future__ import annotations

import torch


class Replaced:
    """A decode program whose fed vectors are replaced (`vectors`); the rest is the program's."""

    def __init__(self, program):
        self.program = program

    def __getattr__(self, name):  # everything else is the wrapped program's
        if name == "program":
            raise AttributeError(name)
        return getattr(self.program, name)

    def select(self, items: list[int], device) -> None:
        """The evaluation items of the next batch's rows."""

    def init_state(self, batch: int, device) -> dict:
        state = self.program.init_state(batch, device)
        state["probe_fed"] = torch.zeros(batch, dtype=torch.long, device=device)
        return state

    def feed_vectors(self, state, hidden, feed, generator=None):
        vectors, logp = self.program.feed_vectors(state, hidden, feed, generator)
        rows = torch.arange(vectors.shape[0], device=vectors.device)
        new = self.vectors(vectors, state["probe_fed"], rows).to(vectors.dtype)
        state["probe_fed"].add_(feed.long())
        return torch.where(feed.unsqueeze(1), new, vectors), logp

    def chunk(self, state, out):
        """A chunk append's fed vectors replaced the same way, in order along each row."""
        req = self.program.chunk(state, out)
        if req is None or req.feed is None or req.vectors is None:
            return req
        b, k = req.feed.shape
        dev = req.vectors.device
        feed = (req.feed.to(dev)
                & (torch.arange(k, device=dev) < req.lengths.to(dev).unsqueeze(1)))
        before = state["probe_fed"].unsqueeze(1) + feed.long().cumsum(1) - feed.long()
        rows = torch.arange(b, device=dev).repeat_interleave(k)
        new = self.vectors(req.vectors.flatten(0, 1), before.flatten(), rows)
        req.vectors = torch.where(feed.unsqueeze(-1),
                                  new.view_as(req.vectors).to(req.vectors.dtype), req.vectors)
        state["probe_fed"].add_(feed.long().sum(1))
        return req

    def vectors(self, fed: torch.Tensor, count: torch.Tensor, rows: torch.Tensor
                ) -> torch.Tensor:
        """The replacements [n, h] of the vectors `fed` [n, h]; `count` [n]: latents their row
        fed before; `rows` [n]: their batch rows."""
        raise NotImplementedError


class Zeros(Replaced):
    def vectors(self, fed, count, rows):
        return torch.zeros_like(fed)


class Fixed(Replaced):
    def __init__(self, program, vector: torch.Tensor):
        super().__init__(program)
        self.vector = vector

    def vectors(self, fed, count, rows):
        return self.vector.to(fed.device, fed.dtype).expand_as(fed)


class Bank(Replaced):
    """Row i feeds the latents of item donors[items[i]] ([n, h] each in `latents`)."""

    def __init__(self, program, latents: list[torch.Tensor], donors: list[int]):
        super().__init__(program)
        self.latents, self.donors = latents, donors
        self.bank = self.count = None

    def select(self, items, device):
        chosen = [self.latents[self.donors[i]] for i in items]
        n = max(1, max(x.shape[0] for x in chosen))
        h = chosen[0].shape[1]
        bank = torch.zeros(len(items), n, h)
        for r, x in enumerate(chosen):
            bank[r, : x.shape[0]] = x
        self.bank = bank.to(device)
        self.count = torch.tensor([max(1, x.shape[0]) for x in chosen], device=device)

    def vectors(self, fed, count, rows):
        return self.bank[rows, count % self.count[rows]]


class CutSpans:
    """The recorded spans cut out (module docstring). `recorded[item]`: per span, (latents it
    had, the token that closed it, that token's [3] position offset in the recorded run)."""

    uses_position_offsets = True
    needs_end_prob = False

    def __init__(self, program, recorded: list[list[tuple[int, int, list[int]]]]):
        self.program, self.recorded = program, recorded
        self.start_id, self.latent_id, self.end_id = (program.start_id, program.latent_id,
                                                      program.end_id)
        self.steps = program.steps

    def select(self, items, device):
        spans = [self.recorded[i] for i in items]
        s = max(1, max(len(x) for x in spans))
        b = len(items)
        self.n_spans = torch.tensor([len(x) for x in spans], device=device)
        length = torch.zeros(b, s, dtype=torch.long)
        exit_id = torch.full((b, s), self.end_id, dtype=torch.long)
        offset = torch.zeros(b, s, 3, dtype=torch.long)
        for r, x in enumerate(spans):
            for k, (n, tok, off) in enumerate(x):
                length[r, k], exit_id[r, k], offset[r, k] = n, tok, torch.tensor(off)
        self.length, self.exit_id, self.offset = (length.to(device), exit_id.to(device),
                                                  offset.to(device))

    def init_state(self, batch: int, device) -> dict:
        return {"span": torch.zeros(batch, dtype=torch.long, device=device),
                "removed": torch.zeros(batch, dtype=torch.long, device=device),
                "offset": torch.zeros(batch, 3, dtype=torch.long, device=device)}

    def step(self, state, consumed, sampled, end_prob=None):
        enter = consumed == self.start_id
        rows = torch.arange(consumed.shape[0], device=consumed.device)
        k = state["span"].clamp(max=self.length.shape[1] - 1)
        known = state["span"] < self.n_spans
        closer = torch.where(known, self.exit_id[rows, k], torch.full_like(sampled, self.end_id))
        removed = state["removed"] + torch.where(enter & known, self.length[rows, k], 0)
        # a recorded position offset is the program's own (absolute): it comes back with the
        # closer, on top of the positions the removed latents held
        offset = removed.unsqueeze(1) + torch.where(known.unsqueeze(1), self.offset[rows, k], 0)
        state["offset"].copy_(torch.where(enter.unsqueeze(1), offset, state["offset"]))
        state["removed"].copy_(removed)
        state["span"].add_(enter.long())
        return torch.where(enter, closer, sampled), torch.zeros_like(enter)

    def feed_vectors(self, state, hidden, feed, generator=None):
        return hidden, torch.zeros(hidden.shape[0], device=hidden.device)

    def position_offsets(self, state) -> torch.Tensor:
        return state["offset"].t()
