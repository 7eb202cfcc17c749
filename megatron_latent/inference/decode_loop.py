"""The state of one batch's decoding, in fixed device tensors updated in place.

Each decode iteration reads the last forward's logits and hidden state, samples, applies the
latent rule, records the step at index `j` (a device scalar), and runs the next one-token
forward, writing its outputs back into the same buffers. Nothing in it has a data-dependent
shape, reads the device from the host, or allocates state that outlives it, so on one pipeline
stage the whole iteration (forward, sampling, rule and records) replays as one CUDA graph; the
eager path runs the very same code.
"""

from __future__ import annotations

import torch

from megatron_latent.models.qwen25vl.kv_cache import KVCache
from megatron_latent.inference.sampling import SamplingParams, policy_logprobs


class DecodeLoop:
    def __init__(self, cache: KVCache, n_new: int, vocab: int, hidden: int, dtype, rule,
                 pad_id: int):
        b, dev = cache.batch_size, cache.device
        self.cache, self.rule, self.pad_id = cache, rule, pad_id
        self.logits = torch.zeros(b, vocab, device=dev)  # the last forward's outputs
        self.hidden = torch.zeros(b, hidden, dtype=dtype, device=dev)
        self.consumed = torch.zeros(b, dtype=torch.long, device=dev)  # that forward's input id
        self.next_pos = torch.zeros(b, dtype=torch.long, device=dev)  # mRoPE position at j = 0
        # the decode program's per-row offsets of the next forward's positions (3 mRoPE axes)
        self.pos_offset = torch.zeros(3, b, dtype=torch.long, device=dev)
        self.j = torch.zeros((), dtype=torch.long, device=dev)
        self.is_stop = torch.zeros(vocab, dtype=torch.bool, device=dev)
        self.gen = torch.Generator(device=dev)
        self.state = rule.init_state(b, dev) if rule else {}
        self.rec = {"tokens": torch.full((b, n_new), pad_id, dtype=torch.long, device=dev),
                    "logprobs": torch.zeros(b, n_new, device=dev),
                    "feed": torch.zeros(b, n_new, dtype=torch.bool, device=dev),
                    # appended by the program, not sampled (e.g. a span end at the cap)
                    "forced": torch.zeros(b, n_new, dtype=torch.bool, device=dev),
                    "latents": torch.zeros(b, n_new, hidden, dtype=dtype, device=dev),
                    # log-prob of each fed vector as a sampled action (0: deterministic)
                    "latent_logprobs": torch.zeros(b, n_new, device=dev),
                    "pos_offset": torch.zeros(b, n_new, 3, dtype=torch.long, device=dev),
                    "length": torch.full((b,), n_new, dtype=torch.long, device=dev),
                    "finished": torch.zeros(b, dtype=torch.bool, device=dev)}

    def tensors(self) -> list[torch.Tensor]:
        """Everything an iteration mutates (saved and restored around a graph capture)."""
        c = self.cache
        return [self.logits, self.hidden, self.consumed, self.j, self.pos_offset,
                *self.state.values(), *self.rec.values(), c.write_index, c.valid]

    def reset(self, next_pos, stop_ids, seed: int) -> None:
        self.cache.reset()
        self.next_pos.copy_(next_pos)
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
                  "finished"):
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
        r["length"].copy_(torch.where(stop_now, self.j + 1, r["length"]))
        r["finished"].copy_(done | stop_now)
        return tokens, feed, vectors
