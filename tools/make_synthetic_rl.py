#!/usr/bin/env python
"""Write a small synthetic RL prompt set in HyLaR-RL-Data's parquet schema (verl/EasyR1's:
`problem` with <image> placeholders, `answer`, `images` as PNG bytes) on real photos.

    python tools/make_synthetic_rl.py --out data/synthetic_rl --n 64 --seed 0

Read it with `train_grpo.py --data-path OUT`. Deterministic given --seed; content in
megatron_latent/data/synthetic_rl.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_latent.data.synthetic_rl import make_synthetic_rl_parquet  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset directory to create")
    ap.add_argument("--n", type=int, default=64, help="rows (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=112, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=224, help="largest image side in pixels")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = ap.parse_args(argv)
    try:
        path = make_synthetic_rl_parquet(args.out, num=args.n, seed=args.seed,
                                         min_side=args.min_side, max_side=args.max_side,
                                         overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
