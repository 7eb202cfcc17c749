"""Conversion cost on a random Qwen2.5-VL-3B-shaped checkpoint: peak RSS / checkpoint size and
seconds per GB, for HF -> Megatron and Megatron -> HF, each in a fresh process.

    python benchmarks/bench_convert.py --work /tmp/bench_convert [--shape 3b|tiny]

Writes the random HF checkpoint first (bf16, HF tensor names and shapes from transformers'
model built on the meta device; 4 GB shards), then times the two tools/ converters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Qwen2.5-VL-3B-Instruct's config.json values
    "3b": dict(text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                           out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31]),
               tie=True),
    "tiny": dict(text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, intermediate_size=512, vocab_size=4096,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": [4, 6, 6]}),
                 vision=dict(depth=2, hidden_size=128, num_heads=2, intermediate_size=256,
                             out_hidden_size=256, fullatt_block_indexes=[1]),
                 tie=False),
}


def write_random_checkpoint(out: Path, shape: dict, shard_bytes: int = 4 << 30) -> float:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_latent.conversion.hf_mapping import legacy_hf_name

    cfg = Qwen2_5_VLConfig(text_config=shape["text"], vision_config=shape["vision"],
                           tie_word_embeddings=shape["tie"])
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    names = {n: p.shape for n, p in model.named_parameters()}
    if shape["tie"]:
        names.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for n, s in names.items():
        t = (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes and shard:
            flush()
        shard[legacy_hf_name(n)] = t
        size += t.numel() * 2
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    return total / 1e9


def timed(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of one child process (os.wait4 gives that child's own rusage)."""
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.time() - t, usage.ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench_convert")
    p.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    t = time.time()
    gb = write_random_checkpoint(work / "hf", SHAPES[a.shape])
    print(f"random {a.shape} checkpoint: {gb:.2f} GB in {time.time() - t:.0f} s", flush=True)
    py = sys.executable
    rows = []
    for label, cmd in [
        ("hf -> megatron", [py, "tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf"),
                            "--out", str(work / "mc")]),
        ("megatron -> hf", [py, "tools/convert_megatron_to_hf.py", "--ckpt", str(work / "mc"),
                            "--out", str(work / "hf2")]),
    ]:
        secs, rss = timed([*cmd])
        rows.append((label, secs, rss))
        print(f"{label}: {secs:.1f} s, {secs / gb:.2f} s/GB, peak RSS {rss:.2f} GB "
              f"= {rss / gb:.2f} x checkpoint size", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
