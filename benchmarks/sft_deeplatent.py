"""DeepLatent stage 2's side of bench_sft.py (`--method lvr deeplatent`): the method built through
the registry, stage-2 micro-batches in data/deeplatent_batch.py's layout, and the teacher-state
cache the step reads, written by the benchmark.

- Method: `registry.build("deeplatent", ...)` with stage 2 and its defaults (1-block
  LatentFormer, modulation MLPs, scale head, alignment at 4 evenly spaced layers: 1..4 at
  7b-4l; lambda 4.0 / 0.5; one context pass). Its six tokens take the first free ids (where
  LVR's three sit, 151665.. at the 7B shape), as on Qwen2.5-VL's tokenizer.
- Micro-batches: as LVR's (bench_sft.make_micro_batches: one `--image` image right after the
  start, random text, `--seq-length` tokens, nothing padded), but the latent span in the middle
  is a DeepLatent block: `<latent>` scale qmod imod, `--deeplatent-grid`^2 `<|latent_pad|>`
  slots (image-like mRoPE positions), `</latent>`. Loss mask: the second half of the sequence,
  without the targets inside a block (placeholders, pads, `</latent>`), as the stage-2 collate
  gives them. Collated by `collate_stage2` (blocks, question features, their coordinates).
- Teacher cache: the format tools/cache_teacher_states.py writes (`index.json` + one
  safetensors shard, `{sample_id}/L{layer}` [H*W, hidden] bf16), filled with RANDOM states
  (N(0, 1), seeded; not a stage-1 model's: the step's cost does not depend on their values).
  The step reads it from disk as training does (`TeacherCache.get` in `prepare_step`).
- Timed step: `launch_step` as for LVR, so the context pass (a forward-only pass over the
  step's micro-batches, before the training pass) and the cache read are inside the step time.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def build_deeplatent(shape: dict, teacher_dir, **hparams):
    """DeepLatent stage 2 through the registry for `shape` (bench_generate.SHAPES layout)."""
    from bench_deeplatent_block import StubTokenizer

    from megatron_latent.latent import registry

    text, ids = shape["text"], shape["ids"]
    cfg = SimpleNamespace(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                          num_layers=text["num_hidden_layers"], image_token_id=ids["image"],
                          spatial_merge_size=2)
    tok = StubTokenizer(ids["lvr_start"])  # the first free id
    return registry.build("deeplatent", tok, cfg,
                          {"stage": 2, "teacher": str(teacher_dir), **hparams})


def deeplatent_micro_batches(shape: dict, method, *, seq_length: int, mbs: int, num_micro: int,
                             image: int, grid: int, dtype) -> list[dict]:
    """Stage-2 micro-batches on the host (collate_stage2), one block of grid x grid a sample."""
    import torch

    from megatron_latent.data.deeplatent_batch import collate_stage2
    from megatron_latent.data.deeplatent_tokens import END, IMOD, PAD, QMOD, SCALE, START

    ids = shape["ids"]
    tids = {**method.ids, "pad": 0, "<|image_pad|>": ids["image"]}
    if image % 28:
        raise SystemExit(f"--image {image} must be a multiple of 28 (patch 14 x merge 2)")
    side = image // 14
    n_patch, n_img = side * side, side * side // 4
    s, n_lat = seq_length, grid * grid
    a = max(s // 2, n_img + 3)  # <latent> here
    if a + n_lat + 6 >= s:
        raise SystemExit(f"--seq-length {s} too short for a {n_img}-token image and a "
                         f"{grid}x{grid} block")
    high = min(ids.values()) - 16
    block = ([tids[START], tids[SCALE], tids[QMOD], tids[IMOD]] + [tids[PAD]] * n_lat
             + [tids[END]])
    inside = torch.tensor([tids[t] for t in (SCALE, QMOD, IMOD, PAD, END)])
    out = []
    for m in range(num_micro):
        g = torch.Generator().manual_seed(1000 + m)
        samples = []
        for r in range(mbs):
            seq = torch.randint(0, high, (s,), generator=g)
            seq[0], seq[1 + n_img] = ids["vision_start"], ids["vision_end"]
            seq[1:1 + n_img] = ids["image"]
            seq[a:a + len(block)] = torch.tensor(block)
            lab = torch.cat([seq[1:], seq[:1]])
            mask = torch.zeros(s)
            mask[a - 1:s - 1] = 1.0
            mask[torch.isin(lab, inside)] = 0.0
            samples.append({
                "input_ids": seq, "labels": lab, "loss_mask": mask,
                "latent_mask": seq == tids[PAD],
                "pixel_values": torch.randn(n_patch, 3 * 2 * 14 * 14, generator=g).to(dtype),
                "image_grid_thw": torch.tensor([[1, side, side]]),
                "sample_id": f"bench-{m}-{r}", "teacher_grids": [(grid, grid)],
                "source": "bench_sft"})
        out.append(collate_stage2(samples, tids, 2))
    return out


def write_teacher_cache(out_dir, micro_batches: list[dict], layers, hidden: int,
                        seed: int = 0) -> Path:
    """A teacher-state cache for the micro-batches' samples, random bf16 states N(0, 1)."""
    import torch
    from safetensors.torch import save_file

    d = Path(out_dir) / "teacher"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors, index = {}, {}
    for mb in micro_batches:
        for sid, grids in zip(mb["sample_ids"], mb["teacher_grids"]):
            n = sum(h * w for h, w in grids)
            for layer in layers:
                tensors[f"{sid}/L{layer}"] = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
            index[sid] = {"shard": 0, "grids": [list(x) for x in grids], "layers": list(layers),
                          "model_hash": "bench-random-states"}
    save_file(tensors, str(d / "00000.safetensors"))
    (d / "index.json").write_text(json.dumps(index))
    return d


def pinned(batches: list[dict], cuda: bool) -> list[dict]:
    """Tensors in page-locked host memory (as the training loop reads them); lists as they are."""
    import torch

    if not cuda:
        return batches
    return [{k: (v.pin_memory() if torch.is_tensor(v) and k != "image_grid_thw" else v)
             for k, v in mb.items()} for mb in batches]


def setup(shape: dict, args, dtype, cuda: bool, work_dir) -> tuple:
    """-> (method, pinned host micro-batches, description) for bench_sft."""
    import tempfile

    work = Path(work_dir or tempfile.mkdtemp(prefix="bench_deeplatent_"))
    method = build_deeplatent(shape, work / "teacher")
    batches = deeplatent_micro_batches(shape, method, seq_length=args.seq_length,
                                       mbs=args.micro_batch_size,
                                       num_micro=args.num_micro_batches, image=args.image,
                                       grid=args.deeplatent_grid, dtype=dtype)
    hidden = shape["text"]["hidden_size"]
    cache = write_teacher_cache(work, batches, method.align_layers, hidden)
    size = sum(f.stat().st_size for f in cache.iterdir())
    note = (f"DeepLatent stage 2: one {args.deeplatent_grid}x{args.deeplatent_grid} block a "
            f"sample (<latent> + 3 placeholders + {args.deeplatent_grid ** 2} latents + "
            f"</latent>), align layers {method.align_layers}, {method.context_passes} context "
            f"pass(es) in the step; teacher cache of RANDOM bf16 states in {cache} "
            f"({size / 2 ** 20:.1f} MiB, read from disk each step)")
    return method, pinned(batches, cuda), note
