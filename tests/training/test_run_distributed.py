"""The multi-process launcher of our tests: one rank failing while its peer is stuck (as a peer
waiting in a collective for a rank that is gone would be) must surface the failing rank's
traceback at once and kill the peer. Without that, this test waits out the launcher's hour-long
timeout and pytest's timeout (120 s) fails it."""

from __future__ import annotations

import pytest

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.launcher_workers import fail_on_rank, sleep_forever


@pytest.mark.timeout(120)
def test_failing_rank_raises_while_peer_is_stuck():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*ValueError: bad record 7"):
        run_distributed(fail_on_rank, 2, 1, timeout=3600)


def test_hung_ranks_are_killed_and_named():
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] still running after 3 s"):
        run_distributed(sleep_forever, 2, timeout=3)
