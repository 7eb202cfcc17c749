"""Batched KV-cache generation with latent steps, on any TP/PP layout.

One `generate` call: left-pad the prompts -> prefill (vision tower + LLM, cache written) -> decode
one token per step. After every forward the last stage samples a token, the latent rule decides
whether the next input is that token's embedding or the last final-norm hidden state, and those
(ids, feed mask, hidden states) travel from the last pipeline stage to the first for the next
step. A decode iteration (sampling, rule, records, next forward) has fixed shapes and no host
sync (decode_loop.py), so on a GPU it replays as one CUDA graph (PP=1); the host checks for
finished rows every `check_every` steps only.

Each request returns its tokens (latent positions hold the method's latent id), the policy
log-prob of each token (0 at latent positions), the vectors fed at latent positions and their
log-probs as sampled actions (0 for a deterministic program): the RL step trains on exactly
these.

Chunk appends (decode programs with `uses_chunks`, latent/decoding.py): after the prefill and
after every iteration the program may ask for a block of inputs per row (forced ids, vectors,
at given mRoPE offsets), appended at every row's next cache slots by ONE forward of s > 1
tokens at `write_index > 0` (eager, or on graphed decode loops a CUDA graph replay padded to the
program's `chunk_shapes`, cuda_graph.ChunkGraph): causal within the block, full to the valid cache, rows with fewer
inputs leaving masked slots (`KVCache.valid`), which the records drop (decode_loop.py). It sees
that forward's hidden states and may ask for another block, then one-token decoding (graphed
or not) resumes. Such a block's attention is the cache's general masked path (SDPA), not the
one-token kernels. PP = 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_latent.inference.cuda_graph import ChunkGraph
from megatron_latent.inference.fp8_weights import Fp8RolloutWeights
from megatron_latent.ops import decode_gemm
from megatron_latent.inference.decode_loop import DecodeLoop
from megatron_latent.latent.decoding import Chunk, ChunkOutput
from megatron_latent.models.qwen25vl.kv_cache import KVCache
from megatron_latent.inference.sampling import SamplingParams, policy_logprobs, sample
from megatron_latent.inference.stages import StageLink
from megatron_latent.models.qwen25vl.rope_index import rope_index

WEIGHT_PRECISIONS = ("params", "fp8")


@dataclass
class Prompt:
    input_ids: list[int]  # image pads already expanded to the image's merged token count
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    latent_positions: list[int]  # indices into `tokens` whose input was a fed-back hidden state
    latents: torch.Tensor  # [len(latent_positions), hidden]
    finish_reason: str  # "stop" or "length"
    # log-prob of each fed vector as a sampled action [len(latent_positions)] (0: deterministic)
    latent_logprobs: list[float] = field(default_factory=list)
    # indices into `tokens` the decode program appended instead of the sampled id (not actions)
    forced_positions: list[int] = field(default_factory=list)
    # the decode program's records of this row's latent events (latent.decoding.LatentRule
    # .event_records), e.g. a block's sampled continuous actions
    events: list = field(default_factory=list, repr=False)
    # the decode program's mRoPE offsets of each token [len(tokens), 3]; None: it uses none
    position_offsets: torch.Tensor | None = field(default=None, repr=False)
    logits: torch.Tensor | None = field(default=None, repr=False)  # [len(tokens), vocab]


# megatron's compiled bias-dropout-add specialises on sizes 0 and 1 (a decode step's s = 1,
# batch 1), and the vision tower, prefill lengths and batch sizes add their own entries; past
# dynamo's default limit of 8 it runs eager for every new shape (one kernel becomes several in
# each layer: measured in bench_generate, batch 8 run after batch 1)
RECOMPILE_LIMIT = 64


def _allow_shape_variants() -> None:
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)


class Generator:
    def __init__(self, model, *, rule=None, max_context: int | None = None,
                 pad_id: int = 0, cuda_graphs: bool = False, check_every: int = 8,
                 split_attention: bool = True, max_graphs: int = 4,
                 chunk_slots: int | None = None, chunk_graphs: bool = True,
                 weight_precision: str = "params"):
        """`weight_precision`: "params" (the parameters as they are) or "fp8" (the decoder's
        linears on FP8 copies quantized at every call, inference/fp8_weights.py). `chunk_slots`: cache slots beyond max_new_tokens for the empty slots chunk appends
        leave in rows with fewer inputs (a row still gets max_new_tokens tokens at most; when
        the slots run out, generation stops: finish reason "length"); None: the program's
        `chunk_slots`. `chunk_graphs`: with `cuda_graphs`, chunk forwards replay CUDA graphs
        too (per batch and padded chunk size, cuda_graph.ChunkGraph)."""
        self.model, self.cfg, self.rule = model, model.cfg, rule
        if getattr(rule, "bind", None) is not None:  # a program may use the side modules
            rule.bind(model)
        self.chunks = bool(getattr(rule, "uses_chunks", False))
        if chunk_slots is None:
            chunk_slots = int(getattr(rule, "chunk_slots", 0))
        if chunk_slots < 0:
            raise ValueError(f"chunk_slots must be >= 0, got {chunk_slots}")
        self.chunk_slots = chunk_slots
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.pad_id, self.check_every = pad_id, check_every
        self.cuda_graphs, self.chunk_graphs = cuda_graphs, chunk_graphs
        # split-K decode attention (decode_attention.py; used where Triton runs on the device,
        # else SDPA): measured 5.62 vs 6.16 ms a batch-8 7B decode step on an H200
        self.split_attention = split_attention
        self.device = next(model.parameters()).device
        self.link = StageLink(model, self.device)
        if self.chunks and not self.link.single_stage:
            raise ValueError("a decode program with chunk appends (uses_chunks) needs one "
                             "pipeline stage (PP = 1): chunk appends run eager on the stage that "
                             "holds both the embedding and the head")
        self._loops: dict = {}  # graphed decode loops by shape and sampling settings
        self.max_graphs = max_graphs
        if weight_precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"weight_precision {weight_precision!r}: expected one of "
                             f"{WEIGHT_PRECISIONS}")
        self.fp8 = Fp8RolloutWeights(model) if weight_precision == "fp8" else None
        # image/video pads are placeholders the processor expands; a sampled one could not be
        # fed back (no pixels). Recorded log-probs stay those of the unmodified head.
        never = [int(t) for t in getattr(rule, "never_sample", ())]
        self.suppress = torch.tensor([self.cfg.image_token_id, self.cfg.video_token_id, *never],
                                     device=self.device)
        _allow_shape_variants()

    # ------------------------------------------------------------------ inputs
    def _prepare(self, prompts: list[Prompt], params: SamplingParams) -> dict:
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        cfg, merge2 = self.cfg, self.cfg.spatial_merge_size ** 2
        pixels, grids = [], []
        for i, p in enumerate(prompts):
            n = len(p.input_ids)
            if n == 0:
                raise ValueError(f"prompt {i} is empty")
            if n + params.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {i} has {n} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"that exceeds the context length {self.max_context}")
            n_img = sum(t == cfg.image_token_id for t in p.input_ids)
            n_feat = 0 if p.image_grid_thw is None else int(p.image_grid_thw.prod(-1).sum()) // merge2
            if n_img != n_feat or (n_img > 0) != (p.pixel_values is not None):
                raise ValueError(
                    f"prompt {i}: {n_img} image tokens (id {cfg.image_token_id}) but its images "
                    f"give {n_feat} merged features (image_grid_thw="
                    f"{None if p.image_grid_thw is None else p.image_grid_thw.tolist()}, "
                    f"pixel_values {'given' if p.pixel_values is not None else 'missing'})")
            if p.pixel_values is not None:
                pixels.append(p.pixel_values)
                grids.append(p.image_grid_thw)
        bad = [t for t in params.stop_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"stop ids {bad} are outside the vocabulary [0, {cfg.vocab_size})")
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at `width`
            ids[i, width - len(p.input_ids):] = torch.as_tensor(p.input_ids)
            mask[i, width - len(p.input_ids):] = True
        grid = torch.cat(grids) if grids else None
        positions, deltas = rope_index(ids, grid, image_token_id=cfg.image_token_id,
                                       spatial_merge_size=cfg.spatial_merge_size,
                                       attention_mask=mask)
        dev = self.device
        return {"ids": ids.to(dev), "mask": mask.to(dev), "positions": positions.to(dev),
                "next_pos": (mask.sum(1) + deltas[:, 0]).to(dev),
                "pixel_values": torch.cat(pixels).to(dev) if pixels else None,
                "image_grid_thw": grid}  # host bookkeeping (the vision tower reads it there)

    # ------------------------------------------------------------------ forwards
    def _head(self, *, hidden_states, output_layer, output_weight, **_):
        last = hidden_states[-1:]  # [1, b, h] final-norm states of the last position
        logits = self.model.logits(last, output_layer, output_weight, runtime_gather_output=True,
                                   matmul=decode_gemm.gemm)
        return logits[0, :, : self.cfg.vocab_size].float(), last[0]

    def _prefill(self, batch: dict, cache: KVCache):
        cache.mark(batch["mask"])
        cache.dense_prefill = bool(batch["mask"].all())
        prefill = getattr(self.rule, "prefill_step", None)
        step = prefill(batch["ids"], batch["image_grid_thw"]) if prefill is not None else None
        out = self.link.forward(
            lambda: self.model(input_ids=batch["ids"], position_ids=batch["positions"],
                               pixel_values=batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"], inference_context=cache,
                               head=self._head, latent=step),
            seq_len=batch["ids"].shape[1], batch=batch["ids"].shape[0])
        cache.advance(batch["ids"].shape[1])
        cache.dense_prefill = False
        return out

    def _decode(self, cache: KVCache, ids, feed, latent, positions):
        """One token per row: `ids` [b], `feed` [b] (use `latent` [b, h] instead), positions
        [3, b, 1]. Fixed shapes, no host sync: safe inside a CUDA graph."""
        cache.mark(torch.ones_like(feed).unsqueeze(1))
        emb = None
        if self.model.pre_process:
            emb = self.model.language_model.embedding(input_ids=ids.unsqueeze(1), position_ids=None)
            emb = torch.where(feed.view(1, -1, 1), latent.unsqueeze(0).to(emb.dtype), emb)
        out = self.link.forward(
            lambda: self.model(input_ids=ids.unsqueeze(1), position_ids=positions,
                               decoder_input=emb, inference_context=cache, head=self._head),
            seq_len=1, batch=ids.shape[0])
        cache.advance(1)
        return out

    # ------------------------------------------------------------------ chunk appends
    def _hidden_head(self, *, hidden_states, **_):
        return hidden_states  # [s, b, h] final-norm states

    def _logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm states [..., h] -> fp32 logits [..., vocab] (last stage)."""
        lm = self.model.language_model
        weight = (lm.shared_embedding_or_output_weight()
                  if lm.share_embeddings_and_output_weights else None)
        x = hidden.reshape(-1, 1, hidden.shape[-1])
        logits = self.model.logits(x, lm.output_layer, weight, runtime_gather_output=True,
                                   matmul=decode_gemm.gemm)
        return logits[..., : self.cfg.vocab_size].float().reshape(*hidden.shape[:-1], -1)

    def _events(self, loop: DecodeLoop, params: SamplingParams, j: int, logits_log) -> int:
        """After a forward at column j: the program's chunk appends, if it asks for any.
        -> the next column."""
        out = ChunkOutput(0, loop.consumed.unsqueeze(1).clone(),
                          (~loop.rec["finished"]).long(), loop.hidden.unsqueeze(1).clone(),
                          loop.logits.clone(), self._logits_of, loop.gen,
                          graphed=getattr(loop, "chunk_graphs", None) is not None)
        while j < loop.slots:
            req = self.rule.chunk(loop.state, out)
            if req is None:
                break
            done = self._append(loop, req, params, j, logits_log, out.index + 1)
            if done is None:
                break
            out, k = done
            j += k
        return j

    def _append(self, loop: DecodeLoop, req: Chunk, params: SamplingParams, j: int, logits_log,
                index: int):
        """One chunk append at column j: -> (its ChunkOutput, columns used), or None when no
        row appends anything. One host sync (before the forward): the chunk's width, the id
        check and the columns the LM head runs at, read back together."""
        dev, b = self.device, loop.consumed.shape[0]
        ids = req.ids.to(dev).long()
        if ids.dim() != 2 or ids.shape[0] != b or req.lengths.shape != (b,):
            raise ValueError(f"a chunk needs ids [b={b}, k] and lengths [b], got "
                             f"{tuple(ids.shape)} and {tuple(req.lengths.shape)}")
        width, vocab = ids.shape[1], self.cfg.vocab_size
        if width == 0:
            return None
        t = torch.arange(width, device=dev)
        lengths = torch.where(loop.rec["finished"], 0,
                              req.lengths.to(dev).long().clamp(0, width))
        valid = t < lengths.unsqueeze(1)
        ids = torch.where(valid, ids, self.pad_id)
        bad = ((ids < 0) | (ids >= vocab)).any()  # raised after the sync below
        feed = (torch.zeros_like(valid) if req.feed is None else req.feed.to(dev).bool()) & valid
        # a stop id ends the row (nothing after it); a row gets n_new tokens at most, and the
        # cache has slots - j columns left
        stop = valid & ~feed & loop.is_stop[ids.clamp(0, vocab - 1)]
        lengths = torch.minimum(lengths, torch.where(stop, t, width).min(1).values + 1)
        lengths = torch.minimum(lengths, (loop.n_new - (j - loop.holes)).clamp(min=0))
        lengths = lengths.clamp(max=loop.slots - j)
        valid = t < lengths.unsqueeze(1)
        feed = feed & valid
        head = [bad.view(1).long(), lengths.max().view(1)]
        if logits_log is None:  # the LM head only where its output is used
            need, scored0 = self._head_needed(valid, feed, lengths)
            head += [scored0.view(1).long(), need.any(0).long()]
        host = torch.cat(head).tolist()  # the one host sync
        if host[0]:
            raise ValueError(f"chunk ids outside the vocabulary [0, {vocab})")
        k = host[1]
        if k == 0:
            return None
        plan = None if logits_log is not None else self._head_plan(host[3:3 + k], k, b,
                                                                  bool(host[2]))
        t, ids, valid, feed = t[:k], ids[:, :k], valid[:, :k], feed[:, :k]
        h = self.cfg.hidden_size
        vectors = (torch.zeros(b, k, h, device=dev) if req.vectors is None
                   else req.vectors[:, :k].to(dev))
        vec_logp = (torch.zeros(b, k, device=dev) if req.vector_logprobs is None
                    else req.vector_logprobs[:, :k].to(dev).float())
        offsets = (torch.zeros(b, k, 3, dtype=torch.long, device=dev) if req.offsets is None
                   else req.offsets[:, :k].to(dev).long())
        offsets = torch.where(valid.unsqueeze(-1), offsets, 0)
        positions = ((loop.next_pos + loop.j).view(1, b, 1) + t.view(1, 1, k)
                     + offsets.permute(2, 0, 1))  # [3, b, k]
        hidden = self._chunk_forward(loop, ids, valid, feed, vectors, positions, j)  # [b, k, h]
        loop.cache.advance(k)
        # logits: each input's log-prob under the logits before it, and the rows' last ones
        rows, last = torch.arange(b, device=dev), (lengths - 1).clamp(min=0)
        if logits_log is not None:
            logp, new_logits = self._chunk_logits_all(loop, params, hidden, ids, valid, lengths,
                                                      logits_log)
        else:
            logp, new_logits = self._chunk_logits_needed(loop, params, hidden, ids, lengths,
                                                         plan)
        loop.record_chunk(j, ids, valid, feed, vectors, vec_logp, offsets, logp)
        has = lengths > 0
        loop.logits.copy_(new_logits)
        loop.hidden.copy_(torch.where(has.unsqueeze(1), hidden[rows, last], loop.hidden))
        loop.consumed.copy_(torch.where(has, ids[rows, last], loop.consumed))
        return ChunkOutput(index, ids, lengths, hidden, new_logits, self._logits_of, loop.gen,
                           graphed=getattr(loop, "chunk_graphs", None) is not None), k

    def _chunk_body(self, cache: KVCache, ids, valid, feed, vectors, positions):
        """A chunk's forward (ids, valid, feed [b, k], vectors [b, k, h], positions [3, b, k])
        -> final-norm states [k, b, h]; no host sync (CUDA-graph safe); the caller advances
        the cache."""
        cache.mark(valid)
        emb = self.model.language_model.embedding(input_ids=ids, position_ids=None)  # [k, b, h]
        emb = torch.where(feed.t().unsqueeze(-1), vectors.transpose(0, 1).to(emb.dtype), emb)
        return self.link.forward(
            lambda: self.model(input_ids=ids, position_ids=positions, decoder_input=emb,
                               inference_context=cache, head=self._hidden_head),
            seq_len=ids.shape[1], batch=ids.shape[0])

    def _chunk_forward(self, loop: DecodeLoop, ids, valid, feed, vectors, positions, j: int):
        """The chunk's forward at column j -> hidden [b, k, h]: eager, or (graphed decode
        loops) a CUDA graph replay of a fixed shape [b, kp], kp the program's smallest
        `chunk_shapes` size >= k (else k), the padding slots masked (`valid` False, like a
        shorter row's) and after every real input, so no real query sees them; the cache's
        next writes go over them. Eager when the padded block would pass the cache's end."""
        b, k = ids.shape
        graphs = getattr(loop, "chunk_graphs", None)
        kp = min((n for n in getattr(self.rule, "chunk_shapes", ()) if n >= k), default=k)
        # the cache's write index is width + j (the prefill, then one column per token)
        if graphs is None or j + kp > loop.slots:
            return self._chunk_body(loop.cache, ids, valid, feed, vectors, positions
                                    ).transpose(0, 1)
        g = graphs.get(kp)
        if g is None:
            g = graphs[kp] = ChunkGraph(self, loop.cache, b, kp, self.cfg.hidden_size,
                                        self.cfg.params_dtype, self.pad_id)
        return g(ids, valid, feed, vectors, positions)[:, :k]

    def _chunk_logits_all(self, loop, params, hidden, ids, valid, lengths, logits_log):
        """record_logits: the LM head at every position of the chunk (each input's logits are
        logged). -> (log-prob of each input [b, k], the rows' last logits [b, vocab])."""
        b, k, dev = ids.shape[0], ids.shape[1], ids.device
        rows, last = torch.arange(b, device=dev), (lengths - 1).clamp(min=0)
        logp = torch.zeros(b, k, device=dev)
        new_logits, prev = loop.logits.clone(), loop.logits
        # in slices: [b, k, vocab] at once can be large
        step = max(1, (1 << 26) // (b * self.cfg.vocab_size))
        for t0 in range(0, k, step):
            logits = self._logits_of(hidden[:, t0:t0 + step])  # [b, s, vocab]
            s = logits.shape[1]
            before = torch.cat([prev.unsqueeze(1), logits[:, :-1]], 1)
            logp[:, t0:t0 + s] = (policy_logprobs(before, params)
                                  .gather(-1, ids[:, t0:t0 + s, None])[..., 0])
            for u in range(s):
                logits_log.append(torch.where(valid[:, t0 + u, None], before[:, u], 0).cpu())
            here = (lengths > 0) & (last >= t0) & (last < t0 + s)
            new_logits = torch.where(here.unsqueeze(1),
                                     logits[rows, (last - t0).clamp(0, s - 1)], new_logits)
            prev = logits[:, -1]
        return logp, new_logits

    @staticmethod
    def _head_needed(valid, feed, lengths):
        """Where the LM head's output is used: before each recorded (non-fed) input (position
        u - 1, or the logits before the chunk for u = 0) and at each row's last input. Fed
        positions' log-probs are recorded as 0, so a grid of latents needs the head at two
        positions a row. -> (need [b, k] bool, whether input 0 of some row is scored [])."""
        b, k = valid.shape
        rows, last = torch.arange(b, device=valid.device), (lengths - 1).clamp(min=0)
        scored = valid & ~feed  # the inputs whose log-prob is recorded
        need = torch.zeros_like(valid)
        need[:, :-1] = scored[:, 1:]
        need[rows, last] |= lengths > 0
        return need, scored[:, 0].any()

    def _head_plan(self, need: list, k: int, b: int, scored0: bool):
        """The LM head's columns (host `need` per column, from the one sync), in slices, with
        their device indices made now, before the forward is queued (so these small copies
        wait for nothing): per slice (columns, the entries that score an input, those
        inputs)."""
        cols = [c for c in range(k) if need[c]]
        step = max(1, (1 << 26) // (b * self.cfg.vocab_size))
        plan = {"scored0": scored0, "slices": []}
        for c0 in range(0, len(cols), step):
            at = cols[c0:c0 + step]
            ok = [u for u, c in enumerate(at) if c + 1 < k]
            idx = torch.tensor(at + ok + [at[u] + 1 for u in ok], device=self.device)
            n_at, n_ok = len(at), len(ok)
            plan["slices"].append((idx[:n_at], idx[n_at:n_at + n_ok] if n_ok else None,
                                   idx[n_at + n_ok:] if n_ok else None))
        return plan

    def _chunk_logits_needed(self, loop, params, hidden, ids, lengths, plan):
        """The LM head only where its output is used (`_head_needed`, `_head_plan`); no host
        sync. -> as `_chunk_logits_all`."""
        b, k, dev = ids.shape[0], ids.shape[1], ids.device
        rows, last = torch.arange(b, device=dev), (lengths - 1).clamp(min=0)
        logp = torch.zeros(b, k, device=dev)
        new_logits = loop.logits.clone()
        if plan["scored0"]:
            logp[:, 0] = policy_logprobs(loop.logits, params).gather(1, ids[:, :1])[:, 0]
        for at, ok, nxt in plan["slices"]:
            logits = self._logits_of(hidden[:, at])  # [b, s, vocab] at positions `at`
            if ok is not None:  # the inputs these logits score
                logp[:, nxt] = (policy_logprobs(logits[:, ok], params)
                                .gather(-1, ids[:, nxt, None])[..., 0])
            hit = (at.unsqueeze(0) == last.unsqueeze(1)) & (lengths > 0).unsqueeze(1)  # [b, s]
            here = hit.any(1)
            idx = hit.float().argmax(1)
            new_logits = torch.where(here.unsqueeze(1), logits[rows, idx], new_logits)
        return logp, new_logits

    # ------------------------------------------------------------------ one iteration
    def _choose(self, loop: DecodeLoop, params: SamplingParams):
        """Sample from the last logits, apply the decode program, record step j (last stage).
        -> (ids, feed mask, vectors) for the next forward."""
        tok = sample(loop.logits, params, loop.gen, self.suppress)
        if self.rule is None:
            feed = torch.zeros_like(tok, dtype=torch.bool)
            return loop.record(tok, feed, params)
        end_prob = (loop.logits.softmax(-1)[:, self.rule.end_id]
                    if self.rule.needs_end_prob else None)
        appended, feed = self.rule.step(loop.state, loop.consumed, tok, end_prob)
        vectors, logp = self.rule.feed_vectors(loop.state, loop.hidden, feed, loop.gen)
        return loop.record(appended, feed, params, vectors, logp, sampled=tok)

    def _advance(self, loop: DecodeLoop, ids, feed, latent) -> None:
        """The forward of the chosen ids (or latents); its outputs replace the last ones."""
        loop.consumed.copy_(ids)
        loop.take(self._decode(loop.cache, ids, feed, latent, loop.positions()))
        loop.j.add_(1)

    def _iteration(self, loop: DecodeLoop, params: SamplingParams, last: bool) -> None:
        ids = feed = latent = None
        if self.link.last:
            ids, feed, latent = self._choose(loop, params)
        b, h = loop.consumed.shape[0], self.cfg.hidden_size
        ids, feed, latent = self.link.from_last(ids, feed, latent, b, h)
        if self.rule is not None and self.rule.uses_position_offsets:
            off = self.rule.position_offsets(loop.state) if self.link.last else None
            loop.set_offsets(self.link.offsets_from_last(off, b))
        if not last:
            self._advance(loop, ids, feed, latent)

    def _loop(self, b: int, width: int, params: SamplingParams, graphs: bool):
        """The decode loop for this shape and these sampling settings (they are baked into a
        graph), and the callable running one non-final iteration: eager or a graph replay.
        Graphed loops are kept (the `max_graphs` most recently used)."""
        n_new = params.max_new_tokens
        slots = n_new + (self.chunk_slots if self.chunks else 0)
        key = (b, width, n_new, slots, params.temperature, params.top_p, params.top_k)
        if graphs and key in self._loops:
            self._loops[key] = self._loops.pop(key)  # most recently used last
            return self._loops[key]
        cache = KVCache(b, width + slots, self.device, self.cfg.params_dtype,
                        split_attention=self.split_attention)
        loop = DecodeLoop(cache, n_new, self.cfg.vocab_size, self.cfg.hidden_size,
                          self.cfg.params_dtype, self.rule, self.pad_id, slots=slots)
        step = partial(self._iteration, loop, params, False)
        if not graphs:  # eager: nothing worth keeping (a cache per prompt width would pile up)
            return loop, step
        from megatron_latent.inference.cuda_graph import GraphedIteration

        if self.chunks and self.chunk_graphs:
            loop.chunk_graphs = {}  # ChunkGraph by padded chunk size
        self._loops[key] = (loop, GraphedIteration(step, loop.tensors(),
                                                   None if params.greedy else loop.gen))
        while len(self._loops) > self.max_graphs:  # each holds a KV cache and a graph pool
            self._loops.pop(next(iter(self._loops)))
        return self._loops[key]

    def release(self) -> None:
        """Drop the cached decode loops, their KV caches and CUDA graphs (co-located RL: free
        the memory before the training step)."""
        self._loops.clear()
        if self.fp8 is not None:
            self.fp8.release()

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 record_logits: bool = False) -> list[Completion]:
        if self.fp8 is None:
            return self._generate(prompts, params, record_logits)
        with self.fp8.attached():  # quantized from the weights as they are now
            return self._generate(prompts, params, record_logits)

    def _generate(self, prompts, params, record_logits):
        batch = self._prepare(prompts, params)
        b, width = batch["ids"].shape[0], batch["ids"].shape[1]
        # one graph per iteration on one stage; per-step host copies of the logits need eager
        graphs = (self.cuda_graphs and self.device.type == "cuda" and self.link.single_stage
                  and not record_logits and self.max_graphs > 0)
        loop, iterate = self._loop(b, width, params, graphs)
        loop.reset(batch["next_pos"], params.stop_ids, params.seed)
        loop.take(self._prefill(batch, loop.cache))
        loop.consumed.copy_(batch["ids"][:, -1])
        logits_log = [] if record_logits and self.link.last else None
        j = self._events(loop, params, 0, logits_log) if self.chunks else 0  # j: next column
        steps = 0
        while j < loop.slots:
            if logits_log is not None:
                logits_log.append(loop.logits.to("cpu", copy=True))  # a snapshot
            if j == loop.slots - 1:
                self._iteration(loop, params, last=True)
                break
            iterate()
            j, steps = j + 1, steps + 1
            if self.chunks:
                j = self._events(loop, params, j, logits_log)
            if (steps % self.check_every == 0
                    and self.link.all_finished(loop.rec["finished"])):
                break
        rec = self.link.share_records(loop.rec)
        return self._completions(rec, logits_log or [], params.stop_ids)

    def _completions(self, rec, logits_log, stop_ids=()) -> list[Completion]:
        """Each row's columns up to its last token, without the empty slots of chunk appends."""
        rec = {k: v.cpu() for k, v in rec.items()}
        logits = torch.stack(logits_log, 1) if logits_log else None
        offsets = self.rule is not None and (getattr(self.rule, "uses_position_offsets", False)
                                             or self.chunks)
        records = getattr(self.rule, "event_records", None)
        events = records() if records is not None else None
        out = []
        for i in range(rec["tokens"].shape[0]):
            n = int(rec["length"][i])
            keep = ~rec["hole"][i, :n]
            row = {k: rec[k][i, :n][keep] for k in ("tokens", "logprobs", "feed", "forced",
                                                      "latents", "latent_logprobs",
                                                      "pos_offset")}
            feed, tokens = row["feed"], row["tokens"].tolist()
            # finished: a stop id (the last token, not a fed position) or the row's budget
            stopped = (bool(rec["finished"][i]) and len(tokens) > 0 and not bool(feed[-1])
                       and tokens[-1] in stop_ids)
            out.append(Completion(
                tokens=tokens, logprobs=row["logprobs"].tolist(),
                latent_positions=feed.nonzero().flatten().tolist(),
                latents=row["latents"][feed].float(),
                latent_logprobs=row["latent_logprobs"][feed].tolist(),
                forced_positions=row["forced"].nonzero().flatten().tolist(),
                position_offsets=row["pos_offset"] if offsets else None,
                events=list(events[i]) if events else [],
                finish_reason="stop" if stopped else "length",
                logits=None if logits is None else logits[i, :n][keep]))
        return out

