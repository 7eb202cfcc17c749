#!/usr/bin/env python
"""Create a tiny random Qwen2.5-VL Hugging Face checkpoint offline (for tests and demos).

    python tools/make_tiny_qwen25vl.py --out /tmp/tiny-qwen25vl --preset tiny-a --seed 0
"""

import argparse
import sys
from pathlib import Path

# Run from a repo checkout without installing the package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it

from megatron_latent.testing.tiny_checkpoint import PRESETS, make_tiny_qwen25vl  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--preset", default="tiny-a", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    tie = ap.add_mutually_exclusive_group()
    tie.add_argument("--tie-word-embeddings", dest="tie", action="store_true", default=None,
                     help="tie lm_head to the embeddings (default: the preset's choice)")
    tie.add_argument("--untie", dest="tie", action="store_false", help="separate lm_head weights")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 1
    path = make_tiny_qwen25vl(out, preset=args.preset, seed=args.seed, tie_word_embeddings=args.tie,
                              overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
