"""DAPO-style group filtering: strict (low, high) bounds on the group mean, and the pool that
collects kept groups over tries and tops up with dropped ones."""

import pytest
import torch

from megatron_latent.rl.filtering import GroupPool, keep_groups


def test_keep_groups_hand_worked():
    # Groups of 4: means 0.5, 0.0, 1.0, 0.25, -0.25 (a -1 repetition penalty pulls the mean down).
    values = torch.tensor([1.0, 0, 1, 0,  0, 0, 0, 0,  1, 1, 1, 1,  1, 0, 0, 0,  -1, 0, 0, 0])
    expected = [True, False, False, True, False]
    assert keep_groups(values, 4, 0.1, 0.9).tolist() == expected
    assert keep_groups(values.view(5, 4), 4, 0.1, 0.9).tolist() == expected


def test_bounds_are_strict():
    # Groups of 10: one correct -> mean exactly 0.1; nine -> 0.9; both dropped. Two -> 0.2 kept.
    one, nine, two = ([1.0] * k + [0.0] * (10 - k) for k in (1, 9, 2))
    values = torch.tensor(one + nine + two)  # float32: a float32 mean of 0.1 would exceed 0.1
    assert keep_groups(values, 10, 0.1, 0.9).tolist() == [False, False, True]
    assert keep_groups(values.long(), 10, 0.1, 0.9).tolist() == [False, False, True]


@pytest.mark.parametrize("values, group_size, low, high, message", [
    (torch.ones(4), 0, 0.1, 0.9, "group_size=0"),
    (torch.ones(4), 2, 0.9, 0.1, "need low < high"),
    (torch.ones(3), 2, 0.1, 0.9, "3 values do not split into groups of 2"),
    (torch.ones(2, 3), 2, 0.1, 0.9, "shape \\(2, 3\\) but group_size=2"),
    (torch.tensor([]), 2, 0.1, 0.9, "non-empty"),
])
def test_keep_groups_errors(values, group_size, low, high, message):
    with pytest.raises(ValueError, match=message):
        keep_groups(values, group_size, low, high)


def test_pool_stops_when_enough_are_kept():
    pool = GroupPool(3)
    pool.add(["a", "b", "c"], torch.tensor([True, False, True]))
    assert not pool.full
    pool.add(["d", "e", "f"], [False, True, True])
    assert pool.full  # 4 kept after 2 tries: the loop stops here
    groups, stats = pool.take()
    assert groups == ["a", "c", "e"]  # kept, in order; the surplus "f" is discarded
    assert stats == {"tries": 2.0, "kept share": 4 / 6, "topped up": 0.0}


def test_pool_all_filtered_is_topped_up_in_order():
    pool = GroupPool(3)
    pool.add([[0], [1]], [False, False])
    pool.add([[2], [3]], [False, False])
    assert not pool.full
    groups, stats = pool.take()
    assert groups == [[0], [1], [2]]
    assert stats == {"tries": 2.0, "kept share": 0.0, "topped up": 3.0}


def test_pool_kept_first_then_dropped():
    pool = GroupPool(4)
    pool.add(["a", "b", "c"], [False, True, False])
    pool.add(["d", "e"], [False, True])
    groups, stats = pool.take()
    assert groups == ["b", "e", "a", "c"]
    assert stats["topped up"] == 2.0 and stats["kept share"] == pytest.approx(2 / 5)


def test_pool_errors():
    with pytest.raises(ValueError, match="target_groups=0"):
        GroupPool(0)
    pool = GroupPool(3)
    with pytest.raises(ValueError, match="2 groups but a keep mask of 1"):
        pool.add(["a", "b"], [True])
    pool.add(["a", "b"], [True, True])
    with pytest.raises(ValueError, match="2 groups over 1 tries, fewer than the 3"):
        pool.take()
