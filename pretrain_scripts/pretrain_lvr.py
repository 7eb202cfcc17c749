"""LVR stage-1 SFT: `pretrain_sft.py` with `--latent-method lvr` by default (the flags are
pretrain_sft.py's; `--lvr-loss-lambda` weighs the latent MSE)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_sft import main  # noqa: E402

if __name__ == "__main__":
    main(default_method="lvr")
