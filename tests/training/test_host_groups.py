"""parallel.py's gloo twin of the model-parallel group, which the SFT loop uses to agree on a
step's padded length without reading the GPU: over 2 gloo ranks at TP=2 both get the larger
value; re-initialised as TP=1 each keeps its own, and the TP=2 twin is destroyed, not leaked."""

from __future__ import annotations

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.launcher_workers import host_max_across_reinit


def test_host_groups_follow_reinitialisation():
    run_distributed(host_max_across_reinit, 2, timeout=300)
