"""Teacher states (spec 2.4) on tiny-b (fp32, CPU). With a toy stage-1 dataset built here to
the contract (docs/deeplatent.md): `capture_states` equals HF transformers' layer outputs at the
teacher slots; the disk cache (tools/cache_teacher_states.py) equals `capture_states` online,
resumes after a kill without recomputing finished shards, discards half-written ones, refuses
another model's cache and a too-small disk. On DeepLatent's stage-1 dataset, the tool under
torchrun (1 and 2 data-parallel ranks) writes the same cache, equal to `capture_states`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_latent.testing.tools import load_tool
from megatron_latent.latent.teacher import OnlineTeacher, TeacherCache, capture_states
from megatron_latent.models.qwen25vl.rope_index import rope_index
from megatron_latent.testing.samples import photos

REPO = Path(__file__).resolve().parents[2]
LAYERS = (1, 3)  # 3 = tiny-b's last layer: our hook sees it before the final norm
N = 8


def _tool():
    return load_tool("cache_teacher_states")


class ToyStage1:
    """Sample i: a user image and question, then i % 3 assistant images (0: no teacher slots).
    Micro-batches carry the contract's `sample_ids`, `teacher_mask`, `teacher_grids`."""

    def __init__(self, processor, image_token_id: int, n: int = N):
        self.processor, self.image_id, self.n = processor, image_token_id, n
        self.im_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = i % 3
        pics = photos()
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": f"What is in {i}?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Look."}]
                 + [{"type": "image"}, {"type": "text", "text": "Then."}] * k}]
        return {"sample_id": f"s{i:03d}", "text": self.processor.apply_chat_template(msgs),
                "images": [pics[0]] + [pics[1 + j % 2] for j in range(k)]}

    def collate(self, samples):
        enc = self.processor(text=[s["text"] for s in samples],
                             images=[im for s in samples for im in s["images"]],
                             return_tensors="pt", padding=True, padding_side="right")
        ids, attn, thw = enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        grids, g = [], iter(thw.tolist())
        for r, s in enumerate(samples):
            start = int((ids[r] == self.im_start).nonzero().max())  # the assistant turn
            mask[r, start:] = ids[r, start:] == self.image_id
            rows = [next(g) for _ in s["images"]]
            grids.append([(h // 2, w // 2) for _, h, w in rows[1:]])
        pos, _ = rope_index(ids, thw, image_token_id=self.image_id, spatial_merge_size=2,
                            attention_mask=attn)
        return {"input_ids": ids, "attention_mask": attn, "pixel_values": enc["pixel_values"],
                "image_grid_thw": thw, "position_ids": pos,
                "sample_ids": [s["sample_id"] for s in samples], "teacher_mask": mask,
                "teacher_grids": grids}


@pytest.fixture(scope="module")
def setup(tiny_ckpts, megatron_single_rank):
    from megatron_latent.inference.loading import load_for_generation

    path = tiny_ckpts["tiny-b"]
    model, processor, cfg, _ = load_for_generation(path, dtype="float32")
    return path, model, cfg, ToyStage1(processor, cfg.image_token_id)


def test_capture_equals_hf_layer_outputs(setup):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, model, cfg, ds = setup
    mb = ds.collate([ds[1], ds[2]])
    got = capture_states(model, mb, (1, 2, 3))
    assert got[1].shape == (int(mb["teacher_mask"].sum()), cfg.hidden_size)
    assert got[1].shape[0] == sum(h * w for g in mb["teacher_grids"] for h, w in g)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    last = []
    hf.model.language_model.layers[-1].register_forward_hook(lambda m, a, o: last.append(o))
    ids, attn, image_id = mb["input_ids"], mb["attention_mask"], cfg.image_token_id
    with torch.no_grad():
        emb = hf.model.get_input_embeddings()(ids)
        emb[ids == image_id] = torch.cat(hf.model.get_image_features(
            mb["pixel_values"], mb["image_grid_thw"]).pooler_output)
        pos, _ = hf.model.get_rope_index(ids, (ids == image_id).int(), mb["image_grid_thw"],
                                         attention_mask=attn)
        out = hf.model.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=attn,
                                      output_hidden_states=True)
    ref = {1: out.hidden_states[1], 2: out.hidden_states[2],
           3: last[0][0] if isinstance(last[0], tuple) else last[0]}  # before the final norm
    for layer, h in ref.items():
        want = h[mb["teacher_mask"]]
        assert (got[layer] - want).abs().max() <= 1e-5 * want.abs().max(), layer


def test_cache_resumes_after_a_kill_and_equals_online(setup, tmp_path):
    tool = _tool()
    path, model, cfg, ds = setup
    kw = dict(model_hash="h1", hidden_size=cfg.hidden_size, shard_samples=2,
              micro_batch_size=2, dtype=torch.float32, progress=False)

    class Killed(Exception):
        pass

    def kill_after_1(k):
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        tool.write_cache(model, ds, tmp_path, LAYERS, on_shard=kill_after_1, **kw)
    d = tmp_path / "teacher"
    done = {k: (d / f"{k:05d}.safetensors").stat().st_mtime_ns for k in (0, 1)}
    assert not (d / "index.json").exists()
    (d / ".00002.safetensors.tmp-999").write_bytes(b"half a shard")  # a kill while writing
    (d / "00003.safetensors").write_bytes(b"\x00" * 10)  # an unreadable shard
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        stats = tool.write_cache(model, ds, tmp_path, LAYERS, **kw)
    finally:
        handle.remove()
    # shards 2, 3: samples 4-7, one micro-batch each (both hold teacher slots)
    assert stats["shards_done"] == 2 and stats["shards_written"] == 2 and len(calls) == 2
    assert {k: (d / f"{k:05d}.safetensors").stat().st_mtime_ns for k in (0, 1)} == done
    assert not list(d.glob(".*tmp*"))

    cache = TeacherCache(tmp_path, model_hash="h1")
    assert sorted(cache.index) == [f"s{i:03d}" for i in range(N)]
    assert [sid for sid, e in cache.index.items() if not e["grids"]] == ["s000", "s003", "s006"]
    teacher = OnlineTeacher(model, LAYERS)
    for i in range(0, N, 2):
        mb = ds.collate([ds[i], ds[i + 1]])
        online = teacher.get(mb)
        cached = cache.get(mb["sample_ids"], LAYERS)
        for layer in LAYERS:
            assert torch.equal(cached[layer], online[layer]), (i, layer)
    assert cache.get(["s000"], LAYERS)[1].shape == (0, cfg.hidden_size)
    with pytest.raises(KeyError, match="s999"):
        cache.get(["s999"], LAYERS)
    with pytest.raises(ValueError, match="model"):
        TeacherCache(tmp_path, model_hash="h2")


def test_refuses_another_models_cache_and_a_short_disk(setup, tmp_path):
    tool = _tool()
    path, model, cfg, ds = setup
    kw = dict(hidden_size=cfg.hidden_size, shard_samples=4, micro_batch_size=2,
              dtype=torch.bfloat16, progress=False)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(OSError, match="needs .* free"):
            tool.write_cache(model, ds, tmp_path, LAYERS, model_hash="h1",
                             free_bytes=lambda p: 1000, **kw)
        assert not calls and not list((tmp_path / "teacher").glob("*.safetensors"))
        tool.write_cache(model, ds, tmp_path, LAYERS, model_hash="h1", **kw)
        d = tmp_path / "teacher"
        before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
        n_calls = len(calls)
        with pytest.raises(ValueError, match="model h1"):
            tool.write_cache(model, ds, tmp_path, LAYERS, model_hash="h2", **kw)
        assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
        assert len(calls) == n_calls
    finally:
        handle.remove()
    # bf16 storage: the online states rounded to bf16 (the cache's micro-batch: same padding)
    mb = ds.collate([ds[4], ds[5]])
    online = capture_states(model, mb, LAYERS)
    cached = TeacherCache(tmp_path).get(mb["sample_ids"], LAYERS)
    for layer in LAYERS:
        assert cached[layer].dtype == torch.bfloat16
        assert torch.equal(cached[layer], online[layer].to(torch.bfloat16))


@pytest.mark.parametrize("nproc", [pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(1, marks=pytest.mark.gpu)])
def test_torchrun_on_stage1_data(nproc, tiny_ckpts, tmp_path, megatron_single_rank):
    """The tool end to end on DeepLatent's stage-1 dataset (synthetic Zebra-CoT rows): two
    data-parallel ranks (gloo) write one cache (each rank its shards), which equals
    `capture_states` of each sample; on a GPU, one rank on NCCL (its collectives take device
    tensors only: a CPU one failed there)."""
    from transformers import AutoProcessor

    from megatron_latent.data.deeplatent_data import DeepLatentDataset
    from megatron_latent.data.deeplatent_tokens import LATENT_TOKENS
    from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved
    from megatron_latent.inference.loading import load_for_generation
    from megatron_latent.latent.tokens import add_tokens

    tool = _tool()
    data = make_synthetic_interleaved(tmp_path / "data", num=6, val_num=1, seed=0, min_side=112,
                                      max_side=224, progress=False, reasoning_images=2) / "train"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    path = tiny_ckpts["tiny-b"]
    args = ["--ckpt", path, "--data", str(data), "--layers", "1,3", "--cache-dtype", "fp32",
            "--shard-samples", "2", "--dtype", "float32", "--seq-length", "2048",
            "--min-pixels", "3136", "--max-pixels", "50176"]
    out = tmp_path / f"dp{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(REPO / "tools" / "cache_teacher_states.py"), *args, "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "needed" in res.stdout and "ETA" in res.stdout, res.stdout
    index = json.loads((out / "teacher" / "index.json").read_text())
    assert len(index) == 6
    assert {e["model_hash"] for e in index.values()} == {tool.model_hash(path)}
    if nproc == 1:  # the GPU run: equality to capture_states is the CPU case's
        return

    model, proc, cfg, _ = load_for_generation(path, dtype="float32")
    add_tokens(proc.tokenizer, LATENT_TOKENS, cfg.vocab_size, special=False)
    ds = DeepLatentDataset(data, stage=1, tokenizer=proc.tokenizer,
                           image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                           seq_length=2048, min_pixels=3136, max_pixels=50176)
    two = TeacherCache(out)
    for i in range(len(ds)):
        mb = ds.collate([ds[i]])
        online = capture_states(model, mb, LAYERS)
        for cache in (two,):
            cached = cache.get(mb["sample_ids"], LAYERS)
            assert cache.entry(mb["sample_ids"][0])["grids"] == [list(g) for g in
                                                                  mb["teacher_grids"][0]]
            for layer in LAYERS:
                assert torch.allclose(cached[layer], online[layer], atol=1e-6), (i, layer)
