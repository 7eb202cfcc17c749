"""The multi-process launcher of our tests: one rank failing while its peers wait in a
collective must surface that rank's traceback at once, not hang until the timeout."""

from __future__ import annotations

import time

import pytest

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.launcher_workers import fail_on_rank, sleep_forever


def test_failing_rank_raises_while_peer_waits():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*ValueError: bad record 7"):
        run_distributed(fail_on_rank, 2, 1, timeout=120)
    # the peer blocks in a gloo barrier for ever; without fail-fast this waits the full timeout
    assert time.monotonic() - start < 60


def test_hung_ranks_are_killed_and_named():
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] still running after 3 s"):
        run_distributed(sleep_forever, 2, timeout=3)
