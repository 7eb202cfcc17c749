"""The state of one batch's decoding, in fixed device tensors updated in place.

Each decode iteration reads the last forward's logits and hidden state, samples, applies the
latent rule, records the step at index `j` (a device scalar), and runs the next one-token
forward, writing its outputs back into the same buffers. Nothing in it has a data-dependent
shape, reads the device from the host, or allocates state that outlives it, so on one pipeline
stage the whole iteration (forward, sampling, rule and records) replays as one CUDA graph; the
eager path runs the very same code.

Record columns are cache slots: column j is the token of slot `width + j` of every row. A chunk
append (a decode program's block of k_i inputs per row in one forward of max k_i slots,
generator.py) leaves the slots of shorter rows empty: `rec["hole"]` marks them, they are
dropped when the completions are read, and the row's positions (`next_pos`) and token count
(`holes`) skip them, so a row's positions and its `max_new_tokens` budget count its tokens only.
"""

from __future__ import annotations

import torch

from megatron_latent.models.qwen25vl.kv_cache import KVCache
from megatron_latent.inference.sampling import SamplingParams, policy_logprobs


class DecodeLoop:
    def __init__(self, cache: KVCache, n_new: int, vocab: int, hidden: int, dtype, rule,
                 pad_id: int, slots: int | None = None):
        """`n_new` tokens per row at most, in `slots` (>= n_new) record columns / cache slots."""
        b, dev = cache.batch_size, cache.device
        self.cache, self.rule, self.pad_id, self.n_new = cache, rule, pad_id, n_new
        slots = n_new if slots is None else slots
        self.slots = slots
        self.logits = torch.zeros(b, vocab, device=dev)  # the last forward's outputs
        self.hidden = torch.zeros(b, hidden, dtype=dtype, device=dev)
        self.consumed = torch.zeros(b, dtype=torch.long, device=dev)  # that forward's input id
        self.next_pos = torch.zeros(b, dtype=torch.long, device=dev)  # mRoPE position at j = 0
        self.holes = torch.zeros(b, dtype=torch.long, device=dev)  # empty columns before j
        # the decode program's per-row offsets of the next forward's positions (3 mRoPE axes)
        self.pos_offset = torch.zeros(3, b, dtype=torch.long, device=dev)
        self.j = torch.zeros((), dtype=torch.long, device=dev)
        self.is_stop = torch.zeros(vocab, dtype=torch.bool, device=dev)
        self.gen = torch.Generator(device=dev)
        self.state = rule.init_state(b, dev) if rule else {}
        self.rec = {"tokens": torch.full((b, slots), pad_id, dtype=torch.long, device=dev),
                    "logprobs": torch.zeros(b, slots, device=dev),
                    "feed": torch.zeros(b, slots, dtype=torch.bool, device=dev),
                    # appended by the program, not sampled (e.g. a span end at the cap)
                    "forced": torch.zeros(b, slots, dtype=torch.bool, device=dev),
                    "latents": torch.zeros(b, slots, hidden, dtype=dtype, device=dev),
                    # log-prob of each fed vector as a sampled action (0: deterministic)
                    "latent_logprobs": torch.zeros(b, slots, device=dev),
                    "pos_offset": torch.zeros(b, slots, 3, dtype=torch.long, device=dev),
                    # an empty slot of a chunk append (no token: dropped from the completion)
                    "hole": torch.zeros(b, slots, dtype=torch.bool, device=dev),
                    # columns up to the row's last token; finished: a stop or its budget
                    "length": torch.full((b,), slots, dtype=torch.long, device=dev),
                    "finished": torch.zeros(b, dtype=torch.bool, device=dev)}

    def tensors(self) -> list[torch.Tensor]:
        """Everything an iteration mutates (saved and restored around a graph capture)."""
        c = self.cache
        return [self.logits, self.hidden, self.consumed, self.j, self.pos_offset,
                *self.state.values(), *self.rec.values(), c.write_index, c.valid]

    def reset(self, next_pos, stop_ids, seed: int) -> None:
        self.cache.reset()
        self.next_pos.copy_(next_pos)
        self.holes.zero_()
        self.j.zero_()
        self.pos_offset.zero_()
        self.is_stop.zero_()
        if stop_ids:
            self.is_stop[torch.tensor(stop_ids, device=self.is_stop.device)] = True
        self.gen.manual_seed(seed)
        for t in self.state.values():
            t.zero_()
        r = self.rec
        r["tokens"].fill_(self.pad_id)
        r["length"].fill_(r["tokens"].shape[1])
        for k in ("logprobs", "feed", "forced", "latents", "latent_logprobs", "pos_offset",
                  "hole", "finished"):
            r[k].zero_()

    def take(self, out) -> None:
        """A forward's (logits, hidden state) as the last ones; None on a non-last stage."""
        if out is not None:
            self.logits.copy_(out[0])
            self.hidden.copy_(out[1])

    def positions(self) -> torch.Tensor:
        b = self.next_pos.shape[0]
        return (self.next_pos + self.j).view(1, b, 1) + self.pos_offset.view(3, b, 1)

    def set_offsets(self, offsets: torch.Tensor) -> None:
        """The program's [3, b] offsets for the tokens chosen at step j (every stage)."""
        self.pos_offset.copy_(offsets)
        self.rec["pos_offset"].index_copy_(1, self.j.view(1), offsets.t().unsqueeze(1))

    def record_chunk(self, j: int, ids, valid, feed, vectors, vector_logp, offsets, logp):
        """A chunk append's columns j.. (eager): per row its inputs where `valid` [b, k] (ids,
        fed `vectors` where `feed`, their log-probs as actions `vector_logp`, mRoPE `offsets`
        [b, k, 3], the policy log-prob `logp` of each id), empty slots elsewhere. Every input
        is the program's (forced), none sampled. A row ends at a stop id or its n_new-th token
        (the caller cut its inputs there)."""
        r, k = self.rec, ids.shape[1]
        cols = slice(j, j + k)
        feed = feed & valid
        done = r["finished"].clone()
        r["tokens"][:, cols] = torch.where(valid, ids, self.pad_id)
        r["logprobs"][:, cols] = torch.where(valid & ~feed, logp, 0.0)
        r["feed"][:, cols] = feed
        r["forced"][:, cols] = valid & ~feed
        r["latents"][:, cols] = torch.where(feed.unsqueeze(-1), vectors.to(r["latents"].dtype), 0)
        r["latent_logprobs"][:, cols] = torch.where(feed, vector_logp, 0.0)
        r["pos_offset"][:, cols] = torch.where(valid.unsqueeze(-1), offsets, 0)
        r["hole"][:, cols] = ~valid
        n = valid.sum(1)
        last = (n - 1).clamp(min=0).unsqueeze(1)
        stop = (n > 0) & self.is_stop[ids.gather(1, last)[:, 0]] & ~feed.gather(1, last)[:, 0]
        end = ~done & (stop | (j - self.holes + n >= self.n_new))
        r["length"].copy_(torch.where(end, j + n, r["length"]))
        r["finished"].copy_(done | end)
        self.holes.add_(k - n)
        self.next_pos.sub_(k - n)  # the next token's position follows the row's last token
        self.j.add_(k)

    def record(self, appended, feed, params: SamplingParams, vectors=None, vector_logp=None,
               sampled=None):
        """Step j of every row (rows already finished keep the padding); returns what the next
        forward consumes: (ids, feed mask, vectors). `vectors` [b, h]: what a latent step feeds
        (default the hidden state), `vector_logp` [b]: their log-probs as sampled actions,
        `sampled` [b]: the ids the head sampled (an appended id that differs was forced)."""
        vectors = self.hidden if vectors is None else vectors
        r, col = self.rec, self.j.view(1)
        done = r["finished"]
        logp = policy_logprobs(self.logits, params).gather(1, appended.unsqueeze(1))[:, 0]
        feed = feed & ~done
        tokens = torch.where(done, torch.full_like(appended, self.pad_id), appended)
        r["tokens"].index_copy_(1, col, tokens.unsqueeze(1))
        r["logprobs"].index_copy_(1, col, torch.where(feed | done, 0.0, logp).unsqueeze(1))
        r["feed"].index_copy_(1, col, feed.unsqueeze(1))
        if sampled is not None:
            r["forced"].index_copy_(1, col, (~feed & ~done & (appended != sampled)).unsqueeze(1))
        latents = torch.where(feed.unsqueeze(1), vectors.to(r["latents"].dtype), 0)
        r["latents"].index_copy_(1, col, latents.unsqueeze(1))
        if vector_logp is not None:
            r["latent_logprobs"].index_copy_(1, col, torch.where(feed, vector_logp, 0.0)
                                             .unsqueeze(1))
        stop_now = ~done & ~feed & self.is_stop[appended]
        # the row's n_new-th token (its columns minus the holes of chunk appends)
        full = ~done & (self.j + 1 - self.holes >= self.n_new)
        end = stop_now | full
        r["length"].copy_(torch.where(end, self.j + 1, r["length"]))
        r["finished"].copy_(done | end)
        return tokens, feed, vectors
