"""Latent generation throughput: our Megatron generator vs the seeds' HF-transformers loop, same
GPU, same random weights, same prompts, one run.

    python benchmarks/bench_generate.py --shape 7b --batch 1 8 64 [--spec te] [--no-graphs]

Each prompt: one 448x448 image (256 merged visual tokens) + 64 text tokens + <|lvr_start|>, so
every row starts with `--latent-steps` latent steps ("steps" rule) and then decodes text, for
`--new-tokens` appended tokens in all (no stop token: fixed work). Greedy.

Reported per batch size: tokens/s (batch * new tokens / wall time, prefill included) for both
paths and their ratio; the decode step time ((total - prefill-only) / (new - 1), ours from the
median of 3 warm calls of each) and its share
of the HBM-bandwidth bound (bytes read per step = LLM layer weights + final norm + output layer
+ the KV cache at mid-generation, divided by the GPU's peak HBM bandwidth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from profiling import profile_call  # noqa: E402

ROPE = {"rope_type": "default", "rope_theta": 1e6}
SHAPES = {
    # Qwen2.5-VL-7B-Instruct's config.json values
    "7b": dict(text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                         rope_parameters={**ROPE, "mrope_section": [16, 24, 24]}),
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                           out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31],
                           window_size=112),
               ids=dict(image=151655, video=151656, vision_start=151652, vision_end=151653,
                        lvr_start=151665, lvr=151666, lvr_end=151667), tie=False),
    "tiny": dict(text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, intermediate_size=512, vocab_size=4096,
                           rope_parameters={**ROPE, "mrope_section": [4, 6, 6]}),
                 vision=dict(depth=2, hidden_size=128, num_heads=2, intermediate_size=256,
                             out_hidden_size=256, fullatt_block_indexes=[1], window_size=112),
                 ids=dict(image=4000, video=4001, vision_start=4002, vision_end=4003,
                          lvr_start=4004, lvr=4005, lvr_end=4006), tie=False),
}
# Qwen2.5-VL-3B-Instruct's text dims (tied input/output embeddings); the 7B's vision and ids
SHAPES["3b"] = dict(SHAPES["7b"], tie=True,
                    text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                              num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                              rope_parameters={**ROPE, "mrope_section": [16, 24, 24]}),
                    vision={**SHAPES["7b"]["vision"], "out_hidden_size": 2048})
HBM_TBPS = {"H200": 4.8, "H100": 3.35}


def hf_config(shape: dict):
    from transformers import Qwen2_5_VLConfig

    ids = shape["ids"]
    text = dict(hidden_act="silu", max_position_embeddings=32768, **shape["text"])
    vision = dict(hidden_act="silu", in_channels=3, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, tokens_per_second=2, **shape["vision"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=shape["tie"], image_token_id=ids["image"],
                            video_token_id=ids["video"],
                            vision_start_token_id=ids["vision_start"],
                            vision_end_token_id=ids["vision_end"])


def make_prompts(shape: dict, batch: int, text_tokens: int, image: int, device,
                 opener: int | None = None, text=None):
    """`batch` prompts: an image, random text (or `text(generator, n)`'s tokens), then `opener`
    (default `<|lvr_start|>`)."""
    import torch

    from megatron_latent.inference.generator import Prompt

    ids, g = shape["ids"], torch.Generator().manual_seed(0)
    side = image // 14
    grid = torch.tensor([[1, side, side]])
    n_img = side * side // 4
    prompts = []
    for _ in range(batch):
        words = (torch.randint(0, 1000, (text_tokens,), generator=g) if text is None
                 else text(g, text_tokens)).tolist()
        seq = [ids["vision_start"]] + [ids["image"]] * n_img + [ids["vision_end"]] + words
        pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=g).to(device, torch.bfloat16)
        prompts.append(Prompt(seq + [ids["lvr_start"] if opener is None else opener], pixels,
                              grid.to(device)))
    return prompts


def timed(fn, repeat: int = 1):
    """(median wall time of `repeat` calls, the last call's output)."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--latent-steps", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--spec", choices=["te", "local"], default="te")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--split-attention", action=argparse.BooleanOptionalAction, default=True,
                    help="ours: split-K decode attention (Triton; the default) or SDPA")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="print the top GPU kernels of our generate at the first batch size")
    ap.add_argument("--profile-dir", default=None, help="with --profile: save a Chrome trace")
    args = ap.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_latent import parallel
    from megatron_latent.conversion.hf_load import StateDictReader, load_hf_weights
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.latent.decoding import LatentRule
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron_latent.testing.hf_latent_loop import hf_latent_generate

    # CPU only for a smoke run of the script (--shape tiny); figures come from a GPU
    shape = SHAPES[args.shape]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    cfg_hf = hf_config(shape)
    torch.manual_seed(0)
    with dev:
        hf = Qwen2_5_VLForConditionalGeneration._from_config(
            cfg_hf, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    cfg = Qwen25VLConfig.from_hf(cfg_hf.to_dict(), spec=args.spec, params_dtype=torch.bfloat16)
    ours = Qwen25VLModel(cfg).to(dev).eval()
    load_hf_weights(ours, StateDictReader(hf.state_dict(), "random HF model"))
    ids = shape["ids"]
    rule = LatentRule(ids["lvr_start"], ids["lvr"], ids["lvr_end"], "steps", args.latent_steps)
    gen = Generator(ours, rule=rule, cuda_graphs=not args.no_graphs,
                    split_attention=args.split_attention)

    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    tbps = next((v for k, v in HBM_TBPS.items() if k in gpu), None)
    lm = ours.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                       if not n.startswith("embedding."))
    if cfg.tie_word_embeddings:
        weight_bytes += lm.embedding.word_embeddings.weight.numel() * 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_layers * 2 * cfg.num_query_groups * head_dim * 2
    prompt_len = len(make_prompts(shape, 1, args.text_tokens, args.image, dev)[0].input_ids)
    print(f"# {gpu}; shape {args.shape}; spec {args.spec}; cuda graphs {not args.no_graphs}; "
          f"prompt {prompt_len} tokens; {args.new_tokens} new ({args.latent_steps} latent); "
          f"LLM weights read per step {weight_bytes / 1e9:.2f} GB")
    if args.profile:  # one generate call at the first batch size (graphs captured in warm-up)
        prompts = make_prompts(shape, args.batch[0], args.text_tokens, args.image, dev)
        params = SamplingParams(max_new_tokens=args.new_tokens)
        profile_call(f"generate_b{args.batch[0]}", lambda: gen.generate(prompts, params),
                     trace_dir=args.profile_dir)
    rows = []
    for b in args.batch:
        prompts = make_prompts(shape, b, args.text_tokens, args.image, dev)
        full = SamplingParams(max_new_tokens=args.new_tokens)
        one = SamplingParams(max_new_tokens=1)
        for _ in range(2):  # warm-up: decode graph captured on the first call, the vision
            gen.generate(prompts, full)  # tower's on the second sighting of its image layout
        gen.generate(prompts, one)  # the prefill-only call warm too: the step time subtracts it
        t_ours, out = timed(lambda: gen.generate(prompts, full), repeat=3)
        t_ours_pre, _ = timed(lambda: gen.generate(prompts, one), repeat=3)
        row = {"batch": b, "ours_tok_s": b * args.new_tokens / t_ours,
               "ours_step_ms": 1e3 * (t_ours - t_ours_pre) / (args.new_tokens - 1),
               "ours_prefill_ms": 1e3 * t_ours_pre}
        kv = b * (prompt_len + args.new_tokens / 2) * kv_per_token
        if tbps:
            row["hbm_bound_ms"] = 1e3 * (weight_bytes + kv) / (tbps * 1e12)
            row["share_of_bound"] = row["hbm_bound_ms"] / row["ours_step_ms"]
        if not args.skip_hf:
            hf_latent_generate(hf, prompts, rule, 4)
            t_hf, hf_tokens = timed(lambda: hf_latent_generate(hf, prompts, rule, args.new_tokens))
            t_hf_pre, _ = timed(lambda: hf_latent_generate(hf, prompts, rule, 1))
            same = sum(a == c for r, o in zip(hf_tokens, out) for a, c in zip(r, o.tokens))
            row.update(hf_tok_s=b * args.new_tokens / t_hf,
                       hf_step_ms=1e3 * (t_hf - t_hf_pre) / (args.new_tokens - 1),
                       hf_prefill_ms=1e3 * t_hf_pre, ratio=t_hf / t_ours,
                       same_tokens=same / (b * args.new_tokens))
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| batch | ours tok/s | HF tok/s | ratio | ours step ms | HF step ms | HBM bound ms "
          "| share of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours_tok_s']:,.0f} | {r.get('hf_tok_s', float('nan')):,.0f} "
              f"| {r.get('ratio', float('nan')):.2f}x | {r['ours_step_ms']:.2f} "
              f"| {r.get('hf_step_ms', float('nan')):.2f} | {r.get('hbm_bound_ms', float('nan')):.2f} "
              f"| {100 * r.get('share_of_bound', float('nan')):.0f}% |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"gpu": gpu, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
