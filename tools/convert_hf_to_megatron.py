"""Convert an HF Qwen2.5-VL checkpoint into a megatron-core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-VL-7B-Instruct --out ckpt/qwen7b
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir D --out O --tp 4 --pp 2

The result loads at any TP/PP (megatron-core reshards on load); converting at the training layout
only spreads the conversion's memory over tp*pp processes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (= processes / pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--spec", choices=["te", "local"], default="local",
                   help="layer spec recorded for training; the weights are the same")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: the HF config's dtype")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    import torch

    from megatron_latent import parallel
    from megatron_latent.conversion.convert import hf_to_megatron

    dtype = getattr(torch, a.params_dtype) if a.params_dtype else None
    hf_to_megatron(a.hf_dir, a.out, tp=a.tp, pp=a.pp, spec=a.spec, params_dtype=dtype,
                   overwrite=a.overwrite)
    parallel.destroy()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
