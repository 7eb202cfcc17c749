#!/usr/bin/env python
"""Write a small synthetic visual-search dataset in the LVR stage-1 and stage-2 (RL) formats.

    python tools/make_synthetic_lvr.py --out data/synthetic_vsearch --num 200 --seed 0 [--val-num 20]
    python tools/make_synthetic_lvr.py --out data/vsearch_hard --num 200 --difficulty 2

Writes OUT/images/*.png, OUT/train.json and OUT/val.json (stage 1: "<image>\\n<question>" ->
"<lvr>\\n<answer>X</answer>", with the target's normalised xyxy box), OUT/train_rl.json and
OUT/val_rl.json (stage 2: "<question>" -> "<answer>X</answer>") and OUT/meta.json
([{"data_path": "train.json", "image_folder": "images", "ds_name": "synthetic_vsearch"}]).
Relative paths in a meta file resolve against the meta file's own directory. Deterministic given
--seed. See megatron_latent/data/synthetic_lvr.py for the content and the answer vocabulary.
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

from megatron_latent.data.synthetic_lvr import make_synthetic_lvr  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset directory to create")
    ap.add_argument("--num", type=int, default=200, help="train samples (default 200)")
    ap.add_argument("--val-num", type=int, default=20, help="val samples (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=224, help="smallest image side in pixels")
    ap.add_argument("--max-side", type=int, default=448, help="largest image side in pixels")
    ap.add_argument("--difficulty", type=int, choices=(0, 1, 2), default=0,
                    help="0: one small target (default); 1, 2: a smaller target among 2 or 4 "
                         "larger distractors that share the attribute the question names")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        path = make_synthetic_lvr(out, num=args.num, val_num=args.val_num, seed=args.seed,
                                  min_side=args.min_side, max_side=args.max_side,
                                  overwrite=args.overwrite, progress=not args.no_progress,
                                  difficulty=args.difficulty)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
