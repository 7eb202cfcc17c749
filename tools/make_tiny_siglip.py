#!/usr/bin/env python
"""Create a tiny random SigLIP vision checkpoint offline (HyLaR's canvas encoder in tests/demos).

    python tools/make_tiny_siglip.py --out /tmp/tiny-siglip [--hidden 32 --layers 2 --heads 2]
"""

import argparse
import sys
from pathlib import Path

# Run from a repo checkout without installing the package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from megatron_latent.testing.tiny_siglip import make_tiny_siglip  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--legacy-names", action="store_true",
                    help="write transformers 4.x weight names (vision_model.*)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    args = ap.parse_args(argv)
    try:
        path = make_tiny_siglip(args.out, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                image_size=args.image_size, patch=args.patch, seed=args.seed,
                                prefix="vision_model." if args.legacy_names else "",
                                overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
