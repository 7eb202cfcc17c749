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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_latent.ops import decode_gemm
from megatron_latent.inference.decode_loop import DecodeLoop
from megatron_latent.models.qwen25vl.kv_cache import KVCache
from megatron_latent.inference.sampling import SamplingParams, sample
from megatron_latent.inference.stages import StageLink
from megatron_latent.models.qwen25vl.rope_index import rope_index


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
                 split_attention: bool = True, max_graphs: int = 4):
        self.model, self.cfg, self.rule = model, model.cfg, rule
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.pad_id, self.check_every = pad_id, check_every
        self.cuda_graphs = cuda_graphs
        # split-K decode attention (decode_attention.py; used where Triton runs on the device,
        # else SDPA): measured 5.62 vs 6.16 ms a batch-8 7B decode step on an H200
        self.split_attention = split_attention
        self.device = next(model.parameters()).device
        self.link = StageLink(model, self.device)
        self._loops: dict = {}  # graphed decode loops by shape and sampling settings
        self.max_graphs = max_graphs
        # image/video pads are placeholders the processor expands; a sampled one could not be
        # fed back (no pixels). Recorded log-probs stay those of the unmodified head.
        self.suppress = torch.tensor([self.cfg.image_token_id, self.cfg.video_token_id],
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
        out = self.link.forward(
            lambda: self.model(input_ids=batch["ids"], position_ids=batch["positions"],
                               pixel_values=batch["pixel_values"],
                               image_grid_thw=batch["image_grid_thw"], inference_context=cache,
                               head=self._head),
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
        key = (b, width, n_new, params.temperature, params.top_p, params.top_k)
        if graphs and key in self._loops:
            self._loops[key] = self._loops.pop(key)  # most recently used last
            return self._loops[key]
        cache = KVCache(b, width + n_new, self.device, self.cfg.params_dtype,
                        split_attention=self.split_attention)
        loop = DecodeLoop(cache, n_new, self.cfg.vocab_size, self.cfg.hidden_size,
                          self.cfg.params_dtype, self.rule, self.pad_id)
        step = partial(self._iteration, loop, params, False)
        if not graphs:  # eager: nothing worth keeping (a cache per prompt width would pile up)
            return loop, step
        from megatron_latent.inference.cuda_graph import GraphedIteration

        self._loops[key] = (loop, GraphedIteration(step, loop.tensors(),
                                                   None if params.greedy else loop.gen))
        while len(self._loops) > self.max_graphs:  # each holds a KV cache and a graph pool
            self._loops.pop(next(iter(self._loops)))
        return self._loops[key]

    def release(self) -> None:
        """Drop the cached decode loops, their KV caches and CUDA graphs (co-located RL: free
        the memory before the training step)."""
        self._loops.clear()

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 record_logits: bool = False) -> list[Completion]:
        batch = self._prepare(prompts, params)
        b, width, n_new = batch["ids"].shape[0], batch["ids"].shape[1], params.max_new_tokens
        # one graph per iteration on one stage; per-step host copies of the logits need eager
        graphs = (self.cuda_graphs and self.device.type == "cuda" and self.link.single_stage
                  and not record_logits and self.max_graphs > 0)
        loop, iterate = self._loop(b, width, params, graphs)
        loop.reset(batch["next_pos"], params.stop_ids, params.seed)
        loop.take(self._prefill(batch, loop.cache))
        loop.consumed.copy_(batch["ids"][:, -1])
        logits_log = []
        for j in range(n_new):
            if record_logits and self.link.last:
                logits_log.append(loop.logits.to("cpu", copy=True))  # a snapshot
            if j == n_new - 1:
                self._iteration(loop, params, last=True)
                break
            iterate()
            if (j % self.check_every == self.check_every - 1
                    and self.link.all_finished(loop.rec["finished"])):
                break
        rec = self.link.share_records(loop.rec)
        return self._completions(rec, logits_log)

    def _completions(self, rec, logits_log) -> list[Completion]:
        rec = {k: v.cpu() for k, v in rec.items()}
        logits = torch.stack(logits_log, 1) if logits_log else None
        out = []
        for i in range(rec["tokens"].shape[0]):
            n = int(rec["length"][i])
            feed = rec["feed"][i, :n]
            out.append(Completion(
                tokens=rec["tokens"][i, :n].tolist(), logprobs=rec["logprobs"][i, :n].tolist(),
                latent_positions=feed.nonzero().flatten().tolist(),
                latents=rec["latents"][i, :n][feed].float(),
                latent_logprobs=rec["latent_logprobs"][i, :n][feed].tolist(),
                forced_positions=rec["forced"][i, :n].nonzero().flatten().tolist(),
                position_offsets=(rec["pos_offset"][i, :n] if self.rule is not None
                                  and self.rule.uses_position_offsets else None),
                finish_reason="stop" if bool(rec["finished"][i]) else "length",
                logits=None if logits is None else logits[i, :n]))
        return out

