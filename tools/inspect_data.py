"""Show one LVR stage-1 training sample as the model will see it.

    python tools/inspect_data.py --data train.json --hf-dir CKPT [--index 3] [--json]

Tokens (special tokens visible, image-pad runs folded), which tokens are CE targets, image
grids, boxes, and for each <|lvr|> its target visual token (feature index, image, row, col).
--data is a records JSON or a meta JSON; the tokenizer and image processor come from --hf-dir.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="records JSON or meta JSON")
    p.add_argument("--hf-dir", required=True, help="HF Qwen2.5-VL checkpoint (tokenizer, processor)")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image-folder", default=None, help="for a records JSON (default: its dir)")
    p.add_argument("--seq-length", type=int, default=None, help="length limit (default: none)")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (index is then "
                   "into the remaining ones)")
    a = p.parse_args(argv)
    from megatron_latent.data import LvrSftDataset, describe_sample, format_description

    kw = {k: v for k, v in (("min_pixels", a.min_pixels), ("max_pixels", a.max_pixels)) if v}
    ds = LvrSftDataset.from_hf_dir(a.data, a.hf_dir, seq_length=a.seq_length,
                                   image_folder=a.image_folder, skip_bad=a.skip_bad, **kw)
    if not 0 <= a.index < len(ds):
        p.error(f"--index {a.index} out of range: the dataset has {len(ds)} samples")
    d = describe_sample(ds, a.index)
    print(json.dumps(d) if a.json else format_description(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
