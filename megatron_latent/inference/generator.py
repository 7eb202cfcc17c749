"""Batched KV-cache generation with latent steps, on any TP/PP layout.

One `generate` call: left-pad the prompts -> prefill (vision tower + LLM, cache written) -> decode
one token per step. After every forward the last stage samples a token, the latent rule decides
whether the next input is that token's embedding or the last final-norm hidden state, and those
(ids, feed mask, hidden states) travel from the last pipeline stage to the first for the next
step. Decode steps have fixed shapes and no host sync, so on a GPU they can be replayed as one
CUDA graph (PP=1); the host checks for finished rows every `check_every` steps only.

Each request returns its tokens (latent positions hold the method's latent id), the policy
log-prob of each token (0 at latent positions), and the vectors fed at latent positions: the
RL step trains on exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from megatron_latent.inference.kv_cache import KVCache
from megatron_latent.inference.sampling import SamplingParams, policy_logprobs, sample
from megatron_latent.inference.stages import StageLink
from megatron_latent.latent.decoding import LatentRule
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
    logits: torch.Tensor | None = field(default=None, repr=False)  # [len(tokens), vocab]


class Generator:
    def __init__(self, model, *, rule: LatentRule | None = None, max_context: int | None = None,
                 pad_id: int = 0, cuda_graphs: bool = False, check_every: int = 8,
                 split_attention: bool = True):
        self.model, self.cfg, self.rule = model, model.cfg, rule
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.pad_id, self.check_every = pad_id, check_every
        self.cuda_graphs = cuda_graphs
        # split-K decode attention (decode_attention.py; used where Triton runs on the device,
        # else SDPA): measured 5.62 vs 6.16 ms a batch-8 7B decode step on an H200
        self.split_attention = split_attention
        self.device = next(model.parameters()).device
        self.link = StageLink(model, self.device)
        self._graphs: dict = {}
        # image/video pads are placeholders the processor expands; a sampled one could not be
        # fed back (no pixels). Recorded log-probs stay those of the unmodified head.
        self.suppress = torch.tensor([self.cfg.image_token_id, self.cfg.video_token_id],
                                     device=self.device)

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
        logits = self.model.logits(last, output_layer, output_weight, runtime_gather_output=True)
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

    def _decoder(self, b: int, max_len: int):
        """The decode-step callable for this batch shape: eager, or a replayed CUDA graph."""
        if not (self.cuda_graphs and self.device.type == "cuda" and self.link.single_stage):
            cache = KVCache(b, max_len, self.device, self.cfg.params_dtype,
                            split_attention=self.split_attention)
            return cache, lambda *a: self._decode(cache, *a)
        key = (b, max_len)
        if key not in self._graphs:
            from megatron_latent.inference.cuda_graph import GraphedDecode

            cache = KVCache(b, max_len, self.device, self.cfg.params_dtype,
                            split_attention=self.split_attention)
            self._graphs[key] = (cache, GraphedDecode(partial(self._decode, cache), cache, b,
                                                      self.cfg.hidden_size, self.device,
                                                      self.cfg.params_dtype))
        cache, graphed = self._graphs[key]
        cache.reset()
        return cache, graphed

    def release(self) -> None:
        """Drop the cached CUDA graphs and their KV caches (co-located RL: free the memory
        before the training step)."""
        self._graphs.clear()

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams,
                 record_logits: bool = False) -> list[Completion]:
        batch = self._prepare(prompts, params)
        b, width, n_new = batch["ids"].shape[0], batch["ids"].shape[1], params.max_new_tokens
        cache, decode = self._decoder(b, width + n_new)
        dev, h = self.device, self.cfg.hidden_size
        gen = torch.Generator(device=dev).manual_seed(params.seed)
        stops = torch.tensor(params.stop_ids or [-1], device=dev)
        state = self.rule.init_state(b, dev) if self.rule else None
        rec = {"tokens": torch.full((b, n_new), self.pad_id, dtype=torch.long, device=dev),
               "logprobs": torch.zeros(b, n_new, device=dev),
               "feed": torch.zeros(b, n_new, dtype=torch.bool, device=dev),
               "latents": torch.zeros(b, n_new, h, dtype=self.cfg.params_dtype, device=dev),
               "length": torch.full((b,), n_new, dtype=torch.long, device=dev),
               "finished": torch.zeros(b, dtype=torch.bool, device=dev)}
        logits_log = []
        out = self._prefill(batch, cache)
        consumed = batch["ids"][:, -1]
        for j in range(n_new):
            if self.link.last:
                logits, hidden = out
                if record_logits:
                    logits_log.append(logits.cpu())
                appended, feed = self._choose(logits, consumed, state, params, gen)
                self._record(rec, j, appended, feed, hidden, logits, params, stops)
                appended, feed = rec["tokens"][:, j], rec["feed"][:, j]
            else:
                appended = feed = hidden = None
            appended, feed, hidden = self.link.from_last(appended, feed, hidden, b, h)
            if j == n_new - 1 or (j % self.check_every == self.check_every - 1
                                  and bool(self.link.all_finished(rec["finished"]))):
                break
            consumed = appended
            positions = (batch["next_pos"] + j).view(1, b, 1).expand(3, b, 1)
            out = decode(appended, feed, hidden, positions)
        rec = self.link.share_records(rec)
        return self._completions(rec, logits_log)

    def _choose(self, logits, consumed, state, params, gen):
        tok = sample(logits, params, gen, self.suppress)
        if self.rule is None:
            return tok, torch.zeros_like(tok, dtype=torch.bool)
        end_prob = (logits.softmax(-1)[:, self.rule.end_id] if self.rule.needs_end_prob
                    else None)
        return self.rule.step(state, consumed, tok, end_prob)

    @staticmethod
    def _record(rec, j, appended, feed, hidden, logits, params, stops):
        done = rec["finished"]
        logp = policy_logprobs(logits, params).gather(1, appended.unsqueeze(1))[:, 0]
        feed = feed & ~done
        rec["tokens"][:, j] = torch.where(done, rec["tokens"][:, j], appended)
        rec["logprobs"][:, j] = torch.where(feed | done, torch.zeros_like(logp), logp)
        rec["feed"][:, j] = feed
        rec["latents"][:, j] = torch.where(feed.unsqueeze(1), hidden.to(rec["latents"].dtype),
                                           rec["latents"][:, j])
        stop_now = ~done & ~feed & torch.isin(appended, stops)
        rec["length"] = torch.where(stop_now, torch.full_like(rec["length"], j + 1),
                                    rec["length"])
        rec["finished"] = done | stop_now

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
                finish_reason="stop" if bool(rec["finished"][i]) else "length",
                logits=None if logits is None else logits[i, :n]))
        return out

