#!/usr/bin/env python
"""Write a small synthetic Zebra-CoT-style set (HyLaR SFT data) on real photos.

    python tools/make_synthetic_interleaved.py --out data/synthetic_zebra --n 200 --seed 0 [--val-n 16]

Writes OUT/train/<sub-task>/*.parquet and OUT/val/<sub-task>/*.parquet (columns Question, Text
Reasoning Trace, Final Answer, problem_image_1, reasoning_image_1); read them with
ZebraCotDataset(OUT/train, ...). Deterministic given --seed. See
megatron_latent/data/synthetic_interleaved.py for the content.
"""

import argparse
import sys
from pathlib import Path

# Run from a repo checkout without installing the package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset directory to create")
    ap.add_argument("--n", type=int, default=200, help="train rows (default 200)")
    ap.add_argument("--val-n", type=int, default=16, help="val rows (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=224, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=448, help="largest image side in pixels")
    ap.add_argument("--reasoning-images", type=int, default=1,
                    help="zoom steps per row: reasoning images (DeepLatent: latent blocks)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    try:
        path = make_synthetic_interleaved(args.out, num=args.n, val_num=args.val_n, seed=args.seed,
                                          min_side=args.min_side, max_side=args.max_side,
                                          reasoning_images=args.reasoning_images,
                                          overwrite=args.overwrite, progress=not args.no_progress)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
