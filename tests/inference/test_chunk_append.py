"""Chunk appends (spec 2.8 v2): a decode program appends a whole block per row in ONE forward at a
non-zero cache position (rows without an event leave masked slots), sees that forward's hidden
states, appends the next block from them, then one-token decoding resumes. A toy program: on a
trigger (forced at chosen steps, or ending the prompt) it appends 3 placeholders in one chunk,
then a grid of H x W vectors (H, W from the first placeholder's hidden state, the vectors a
fixed linear map of the mean of the three) at image-like mRoPE positions and an end id in a
second chunk; the text after the block continues at the block's max position. Checked (fp32,
CPU, tiny checkpoint): chunked = the same tokens and vectors fed one per step = an uncached
recompute with the vectors injected; a row in a batch = the row alone; RL's rollout micro-batch
replays the positions."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.inference.generator import Generator
from megatron_latent.inference.prompts import build_prompt
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.latent.base import InjectLatents
from megatron_latent.latent.decoding import Chunk, LatentRule
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.models.qwen25vl.rope_index import rope_index
from megatron_latent.rl.rollout import rollout_micro_batches
from megatron_latent.testing.generation import Replay, lvr_processor
from megatron_latent.testing.samples import photos

MAX_GRID = 4  # H, W in {1, 2}


def grid_size(h_s: torch.Tensor):
    """(H, W) [b] from the scale placeholder's hidden state (a stand-in for a scale head)."""
    return 1 + (h_s[:, 6] > 0).long(), 1 + (h_s[:, 7] > 0).long()


class ToyBlocks(LatentRule):
    """The trigger is sampled text, or forced at a row's scheduled decode steps; after the
    forward consuming it: chunk 1 = the 3 placeholders, chunk 2 = the grid vectors then `end`."""

    uses_chunks = True
    uses_position_offsets = True
    chunk_slots = 48  # the generator's default spare slots for the padding of chunk appends

    def __init__(self, trigger, placeholders, latent, end, maps, schedule: torch.Tensor):
        super().__init__(trigger, latent, end, "forced", steps=MAX_GRID)
        self.trigger, self.maps, self.schedule = trigger, maps, schedule  # maps [4, h, h]
        self.placeholders = torch.tensor(placeholders)
        self.never_sample = (trigger, *placeholders, latent, end)
        self.seen = []  # (index, lengths) of the forwards `chunk` saw

    def init_state(self, batch, device):
        self.sched = self.schedule.to(device)  # no host copies inside a captured iteration
        return {"steps": torch.zeros(batch, dtype=torch.long, device=device),
                "shift": torch.zeros(batch, dtype=torch.long, device=device)}

    def step(self, state, consumed, sampled, end_prob=None):
        rows = torch.arange(sampled.shape[0], device=sampled.device)
        n = state["steps"].clamp(max=self.schedule.shape[1] - 1)
        force = self.sched[rows, n] & (state["steps"] < self.schedule.shape[1])
        state["steps"].add_(1)
        return torch.where(force, torch.full_like(sampled, self.trigger), sampled), \
            torch.zeros_like(force)

    def position_offsets(self, state):  # text after a block: its max position + 1, ...
        return state["shift"].expand(3, -1)

    def chunk(self, state, out):
        b, dev = out.ids.shape[0], out.ids.device
        shift = state["shift"]
        self.seen.append((out.index, out.lengths.tolist()))
        if out.index == 0:
            rows = (out.lengths > 0) & (out.ids[:, 0] == self.trigger)
            if not bool(rows.any()):
                return None
            return Chunk(self.placeholders.to(dev).expand(b, 3), torch.where(rows, 3, 0),
                         offsets=shift.view(b, 1, 1).expand(b, 3, 3))
        if out.index != 1:
            return None
        rows = out.lengths == 3
        h = out.hidden[:, :3].float()
        hh, ww = grid_size(h[:, 0])
        n = hh * ww
        z = torch.einsum("bd,kde->bke", h.mean(1), self.maps.to(dev))  # [b, 4, h]
        k = torch.arange(MAX_GRID + 1, device=dev).expand(b, -1)
        feed = k < n.unsqueeze(1)
        ids = torch.where(feed, self.latent_id, self.end_id)
        vectors = torch.cat([z, torch.zeros_like(z[:, :1])], 1)
        slot = torch.stack([-k, k // ww.unsqueeze(1) - k, k % ww.unsqueeze(1) - k], -1)
        after = (torch.maximum(hh, ww) - n).view(b, 1, 1)  # `end` at the block's max position
        offsets = torch.where(feed.unsqueeze(-1), slot, after) + shift.view(b, 1, 1)
        state["shift"].copy_(torch.where(rows, shift + after.view(b), shift))
        return Chunk(ids, torch.where(rows, n + 1, 0), feed, vectors, offsets)


def _case(path, spec="local", dtype=torch.float32, device="cpu"):
    proc, ids = lvr_processor(path)
    cfg = Qwen25VLConfig.from_hf(path, spec=spec, params_dtype=dtype)
    model = Qwen25VLModel(cfg).to(device)
    load_hf_weights(model, path)
    model.eval()
    tok = proc.tokenizer
    ph = photos()
    prompts = [build_prompt(proc, "Where is the astronaut looking?", [ph[0]],
                            answer_prefix="<|lvr_start|>"),  # an event right after the prefill
               build_prompt(proc, "Describe the cat.", [ph[2]]),
               build_prompt(proc, "What is in the picture?", [ph[1]])]
    schedule = torch.zeros(3, 12, dtype=torch.bool)
    schedule[0, 6] = schedule[1, 2] = schedule[1, 6] = True  # row 2: never
    place = [tok.convert_tokens_to_ids(t) for t in ("x", "y", "z")]  # plain text ids
    assert len(set(place)) == 3 and None not in place and tok.unk_token_id not in place
    torch.manual_seed(0)
    maps = torch.randn(MAX_GRID, cfg.hidden_size, cfg.hidden_size) / cfg.hidden_size ** 0.5
    program = ToyBlocks(ids["<|lvr_start|>"], place, ids["<|lvr|>"], ids["<|lvr_end|>"], maps,
                        schedule)
    return dict(model=model, cfg=cfg, pad=tok.pad_token_id, prompts=prompts, program=program,
                schedule=schedule, place=place, ids=ids)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, megatron_single_rank):
    return _case(tiny_ckpts["tiny-a"])


def _blocks(c, place):
    """(first placeholder index, H*W) of each block of a completion."""
    out = []
    for j in range(len(c.tokens) - 2):
        if c.tokens[j:j + 3] == place:
            n = 0
            while j + 3 + n in c.latent_positions:
                n += 1
            out.append((j, n))
    return out


@torch.no_grad()
def _recompute(model, cfg, prompt, c):
    """Uncached forward over prompt + completion with the vectors injected at the recorded
    positions: (logits before each completion token [n, v], final-norm hidden [n, h], the
    positions [3, 1, s]), on the host."""
    dev = next(model.parameters()).device
    full = torch.tensor([prompt.input_ids + c.tokens])
    p = len(prompt.input_ids)
    pos, _ = rope_index(full, prompt.image_grid_thw, image_token_id=cfg.image_token_id,
                        spatial_merge_size=cfg.spatial_merge_size)
    pos[:, 0, p:] += c.position_offsets.t()
    mask = torch.zeros_like(full, dtype=torch.bool)
    mask[0, [p + j for j in c.latent_positions]] = True
    latent = InjectLatents(mask.to(dev), c.latents.to(dev))
    kw = dict(position_ids=pos.to(dev), pixel_values=prompt.pixel_values.to(dev),
              image_grid_thw=prompt.image_grid_thw, latent=latent)
    logits = model(full.to(dev), **kw)
    hidden = model(full.to(dev), head=lambda *, hidden_states, **_: hidden_states, **kw)
    return (logits[0, p - 1: p - 1 + len(c.tokens)].float().cpu(), hidden[p:, 0].float().cpu(),
            pos)


def _same(a, b, tol=1e-4):
    assert a.tokens == b.tokens
    assert a.latent_positions == b.latent_positions
    assert torch.allclose(a.latents, b.latents, atol=tol, rtol=0)
    assert torch.equal(a.position_offsets, b.position_offsets)
    assert (a.logits - b.logits).abs().max().item() <= tol
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tol


def test_chunk_append_equals_steps_and_recompute(setup):
    s = setup
    model, cfg, prompts, program = s["model"], s["cfg"], s["prompts"], s["program"]
    params = SamplingParams(max_new_tokens=22)
    program.seen.clear()
    out = Generator(model, rule=program, pad_id=s["pad"]).generate(prompts, params,
                                                                   record_logits=True)
    blocks = [_blocks(c, s["place"]) for c in out]
    # row 0: at once and after its 7th decode step; row 1: twice; row 2: never
    assert [len(x) for x in blocks] == [2, 2, 0], [c.tokens for c in out]
    assert len({n for x in blocks for _, n in x}) > 1  # grids of different sizes
    # one chunk held two rows' grids of different sizes (padded) beside a row without an event
    assert any(i == 2 and len(set(n)) == 3 for i, n in program.seen), program.seen
    for c, x in zip(out, blocks):
        assert len(c.tokens) == params.max_new_tokens and c.finish_reason == "length"
        assert sorted(c.forced_positions + c.latent_positions) == sorted(
            [j - 1 for j, _ in x if j > 0] + [i for j, n in x for i in range(j, j + n + 4)])
        for j, n in x:
            assert c.tokens[j + 3 + n] == program.end_id
    # (1) the same ids and vectors fed one per step, and an uncached recompute
    replay = Replay(out, program.latent_id, program.end_id, program.never_sample, cfg.hidden_size)
    steps = Generator(model, rule=replay, pad_id=s["pad"]).generate(prompts, params,
                                                                    record_logits=True)
    pad = s["pad"]
    width = max(len(p.input_ids) + len(c.tokens) for p, c in zip(prompts, out))
    mb = rollout_micro_batches(prompts, out, torch.zeros(3), cfg=cfg, pad_id=pad,
                               micro_batch_size=3, pad_to=width)[0]
    for i, (prompt, c, c1) in enumerate(zip(prompts, out, steps)):
        _same(c, c1)
        assert set(c1.forced_positions) <= set(c.forced_positions)
        ref, hidden, pos = _recompute(model, cfg, prompt, c)
        assert (ref - c.logits).abs().max().item() <= 1e-4
        for j, n in blocks[i]:  # the grid came from these placeholders' hidden states
            hh, ww = grid_size(hidden[j:j + 1])
            assert int(hh * ww) == n
            want = torch.einsum("d,kde->ke", hidden[j:j + 3].mean(0), program.maps)[:n]
            got = c.latents[[c.latent_positions.index(q) for q in range(j + 3, j + 3 + n)]]
            assert torch.allclose(got, want, atol=1e-4, rtol=0)
            # image-like: slot (r, q) at (p, p + r, p + q); `end` at p + max(H, W)
            p0 = pos[:, 0, len(prompt.input_ids) + j + 3]
            grid = pos[:, 0, len(prompt.input_ids) + j + 3: len(prompt.input_ids) + j + 4 + n]
            want_pos = [[int(p0[0]), int(p0[1]) + q // int(ww), int(p0[2]) + q % int(ww)]
                        for q in range(n)] + [[int(p0[0]) + max(int(hh), int(ww))] * 3]
            assert grid.t().tolist() == want_pos
        # (3) RL's micro-batch replays the same positions and vectors
        assert torch.equal(mb["position_ids"][:, i, :pos.shape[2]], pos[:, 0])
        assert mb["latent_mask"][i].sum() == len(c.latent_positions)
    assert torch.equal(mb["latent_vectors"], torch.cat([c.latents for c in out]))


def test_chunk_rows_alone_and_budget(setup):
    """(2) a row in a batch (other rows' events leave masked slots in it) = the row alone; and
    without spare slots (chunk_slots=0) rows end early, a prefix of the full run."""
    s = setup
    model, prompts, program = s["model"], s["prompts"], s["program"]
    params = SamplingParams(max_new_tokens=16)
    full = Generator(model, rule=program, pad_id=s["pad"], chunk_slots=48).generate(
        prompts, params, record_logits=True)
    for i in range(3):
        alone = ToyBlocks(program.trigger, s["place"], program.latent_id, program.end_id,
                          program.maps, s["schedule"][i:i + 1])
        one = Generator(model, rule=alone, pad_id=s["pad"]).generate([prompts[i]], params,
                                                                     record_logits=True)[0]
        _same(full[i], one)
    short = Generator(model, rule=program, pad_id=s["pad"], chunk_slots=0).generate(
        prompts, params)
    assert any(len(c.tokens) < params.max_new_tokens for c in short)
    for a, c in zip(short, full):
        assert a.tokens == c.tokens[:len(a.tokens)] and a.finish_reason == "length"
        assert torch.equal(a.position_offsets, c.position_offsets[:len(a.tokens)])
    stop = SamplingParams(max_new_tokens=16, stop_ids=(program.end_id,))  # a forced stop id
    ended = Generator(model, rule=program, pad_id=s["pad"], chunk_slots=48).generate(
        prompts[:2], stop)
    for a, c in zip(ended, full):
        n = c.tokens.index(program.end_id) + 1
        assert a.tokens == c.tokens[:n] and a.finish_reason == "stop"


def test_chunk_logits_only_where_needed(setup, monkeypatch):
    """Without record_logits the chunk path runs the LM head only before the recorded (non-fed)
    inputs and at each row's last input: same tokens, log-probs and latents as the head at
    every position (record_logits), and far fewer head positions on the grid chunks."""
    from megatron_latent.inference import generator as g

    s = setup
    model, prompts, program = s["model"], s["prompts"], s["program"]
    params = SamplingParams(max_new_tokens=22)
    gen = Generator(model, rule=program, pad_id=s["pad"])
    full = gen.generate(prompts, params, record_logits=True)
    seen = []
    real = g.Generator._logits_of

    def counted(self, hidden):
        seen.append(hidden.shape[1] if hidden.dim() == 3 else 1)
        return real(self, hidden)

    monkeypatch.setattr(g.Generator, "_logits_of", counted)
    lean = gen.generate(prompts, params)
    for a, c in zip(full, lean):
        assert a.tokens == c.tokens and a.latent_positions == c.latent_positions
        assert a.forced_positions == c.forced_positions
        assert torch.equal(a.latents, c.latents)
        assert torch.equal(a.position_offsets, c.position_offsets)
        assert max(abs(x - y) for x, y in zip(a.logprobs, c.logprobs)) <= 1e-5
    # a grid chunk (k = H*W + 1 <= 5) needs the head at <= 2 positions per row with an event
    assert seen and max(seen) <= 4, seen


def test_chunk_program_refuses_pipeline_stages(setup, monkeypatch):
    from megatron_latent.inference import generator as g

    class TwoStages(g.StageLink):
        def __init__(self, model, device):
            super().__init__(model, device)
            self.single_stage = False

    monkeypatch.setattr(g, "StageLink", TwoStages)
    with pytest.raises(ValueError, match="PP = 1"):
        Generator(setup["model"], rule=setup["program"], pad_id=setup["pad"])


@pytest.mark.gpu
@pytest.mark.parametrize("spec,dtype", [("local", torch.float32), ("local", torch.bfloat16),
                                        ("te", torch.bfloat16)])
def test_chunk_append_with_cuda_graphs(spec, dtype, tiny_ckpts, megatron_single_rank):
    """On a GPU: one-token steps replayed as a CUDA graph (split-K attention) between eager
    chunk appends (SDPA over the masked cache) equal all-eager decoding; fp32 also equals the
    uncached recompute."""
    if spec == "te":
        pytest.importorskip("transformer_engine")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    s = _case(tiny_ckpts["tiny-a"], spec, dtype, "cuda")
    model, prompts, program = s["model"], s["prompts"], s["program"]
    params = SamplingParams(max_new_tokens=22)
    runs = {}
    for graphs in (False, True):
        gen = Generator(model, rule=program, cuda_graphs=graphs, pad_id=s["pad"],
                        chunk_slots=48)
        first = gen.generate(prompts, params)  # with graphs: captures
        runs[graphs] = gen.generate(prompts, params)  # replays
        assert [c.tokens for c in first] == [c.tokens for c in runs[graphs]]
    assert len(gen._loops) == 1  # the graphed loop was used
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.tokens == eager.tokens
        assert graphed.latent_positions == eager.latent_positions
        assert torch.equal(graphed.position_offsets, eager.position_offsets)
        assert torch.equal(graphed.latents, eager.latents)
        assert graphed.logprobs == eager.logprobs
    assert [len(_blocks(c, s["place"])) for c in runs[True]] == [2, 2, 0]
    print(f"\n[{spec} {dtype}] chunked, graphed == eager: {[c.tokens for c in runs[True]]}")
    if dtype == torch.float32:
        recorded = Generator(model, rule=program, pad_id=s["pad"], chunk_slots=48).generate(
            prompts, params, record_logits=True)
        for prompt, c, graphed in zip(prompts, recorded, runs[True]):
            assert c.tokens == graphed.tokens
            ref = _recompute(model, s["cfg"], prompt, c)[0]
            assert (ref - c.logits).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shapes", [(torch.float32, (3, 5)), (torch.float32, ()),
                                          (torch.bfloat16, ())])
def test_graphed_chunks_equal_eager_chunks(dtype, shapes, tiny_ckpts, megatron_single_rank):
    """On a GPU, graphed decode steps: chunk forwards replayed as CUDA graphs (per batch and
    chunk size; `shapes` (3, 5): grids padded to 4 latents + end, masked slots) equal eager
    chunk forwards; exactly where the shapes are not padded."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    s = _case(tiny_ckpts["tiny-a"], "local", dtype, "cuda")
    model, prompts, program = s["model"], s["prompts"], s["program"]
    program.chunk_shapes = shapes
    params = SamplingParams(max_new_tokens=22)
    runs = {}
    for chunk_graphs in (False, True):
        gen = Generator(model, rule=program, cuda_graphs=True, pad_id=s["pad"], chunk_slots=48,
                        chunk_graphs=chunk_graphs)
        first = gen.generate(prompts, params)  # captures
        runs[chunk_graphs] = gen.generate(prompts, params)  # replays
        assert [c.tokens for c in first] == [c.tokens for c in runs[chunk_graphs]]
        (loop, _), = gen._loops.values()
        graphs = getattr(loop, "chunk_graphs", None)
        if chunk_graphs:
            assert graphs and all(g.graph is not None for g in graphs.values())
            if shapes:
                assert sorted(graphs) == [3, 5]
        else:
            assert graphs is None
    assert [len(_blocks(c, s["place"])) for c in runs[True]] == [2, 2, 0]
    tol = 0 if not shapes else 1e-4
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.tokens == eager.tokens
        assert graphed.latent_positions == eager.latent_positions
        assert torch.equal(graphed.position_offsets, eager.position_offsets)
        assert torch.allclose(graphed.latents, eager.latents, atol=tol, rtol=0)
        assert all(abs(x - y) <= tol for x, y in zip(graphed.logprobs, eager.logprobs))
