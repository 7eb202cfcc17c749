"""Convert a megatron_latent distributed checkpoint into an HF Qwen2.5-VL checkpoint
(sharded safetensors, config.json, tokenizer and processor files) that transformers and vLLM load.

    python tools/convert_megatron_to_hf.py --ckpt ckpt/qwen7b --out hf/qwen7b
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from megatron_latent import parallel
    from megatron_latent.conversion.convert import megatron_to_hf

    megatron_to_hf(a.ckpt, a.out, overwrite=a.overwrite, shard_bytes=int(a.max_shard_gb * (1 << 30)))
    parallel.destroy()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
