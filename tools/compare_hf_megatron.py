"""Compare an HF checkpoint with a megatron_latent checkpoint on the same text+image input.

    python tools/compare_hf_megatron.py --hf-dir D --ckpt C [--json]
    torchrun --nproc-per-node 2 tools/compare_hf_megatron.py --hf-dir D --ckpt C --tp 2

Prints the max absolute logit difference and top-1 agreement; exits 1 above --tolerance.
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
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit difference allowed (default 1e-4 fp32, 0.1 bf16/fp16)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    from megatron_latent import parallel
    from megatron_latent.conversion.compare import compare

    res = compare(a.hf_dir, a.ckpt, a.tp, a.pp)
    parallel.destroy()
    if res is None:
        return 0
    tol = a.tolerance if a.tolerance is not None else (1e-4 if res["dtype"] == "float32" else 0.1)
    res["tolerance"], res["ok"] = tol, res["max_abs_diff"] <= tol
    if a.json:
        print(json.dumps(res))
    else:
        print(f"max |logit diff| {res['max_abs_diff']:.3e} (tolerance {tol:g}), top-1 agreement "
              f"{res['top1_agreement']:.4f} over {res['tokens']} tokens "
              f"[{res['dtype']}, tp={res['tp']}, pp={res['pp']}] -> {'OK' if res['ok'] else 'FAIL'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
