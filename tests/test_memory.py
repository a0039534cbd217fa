"""MoCo-style memory: FIFO queue semantics and the moving-average update."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from simclrv2.losses.memory import FeatureQueue, ema_update_


def reference_fifo(size, batches):
    """Write keys one at a time into a ring buffer (oldest overwritten first)."""
    slots, ptr, filled = [None] * size, 0, 0
    for batch in batches:
        for row in batch:
            slots[ptr] = row.tolist()
            ptr = (ptr + 1) % size
            filled = min(size, filled + 1)
    return slots, ptr, filled


def make_batches(sizes, dim=2):
    start, out = 0, []
    for n in sizes:
        out.append(torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim))
        start += n
    return out


@pytest.mark.parametrize("sizes", [[3], [3, 4], [2, 2, 2, 2], [7], [3, 9], [5, 5, 1], [0, 2]])
def test_fifo_matches_one_by_one_ring(sizes):
    q = FeatureQueue(size=5, dim=2)
    batches = make_batches(sizes)
    for b in batches:
        q.enqueue(b)
    slots, ptr, filled = reference_fifo(5, batches)
    assert int(q.ptr) == ptr and int(q.num_filled) == filled
    for i, row in enumerate(slots):
        if row is not None:
            assert q.keys[i].tolist() == row
    assert q.filled().shape == (filled, 2)


def test_fifo_wraparound_explicit():
    q = FeatureQueue(size=4, dim=1)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    assert q.filled().flatten().tolist() == [1.0, 2.0, 3.0]
    q.enqueue(torch.tensor([[4.0], [5.0]]))  # 4 fills slot 3, 5 overwrites the oldest (1)
    assert q.keys.flatten().tolist() == [5.0, 2.0, 3.0, 4.0]
    assert int(q.ptr) == 1 and int(q.num_filled) == 4


def test_initial_state_is_random_unit_vectors_and_nothing_filled():
    q = FeatureQueue(size=6, dim=3)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(6))
    assert q.filled().shape == (0, 3)


def test_state_dict_round_trip():
    q = FeatureQueue(size=5, dim=3)
    q.enqueue(torch.randn(7, 3))
    restored = FeatureQueue(size=5, dim=3)
    restored.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"keys", "ptr", "num_filled"}
    torch.testing.assert_close(restored.keys, q.keys)
    assert int(restored.ptr) == int(q.ptr) and int(restored.num_filled) == int(q.num_filled)
    torch.testing.assert_close(restored.filled(), q.filled())  # the loaded counters, not the fresh queue's
    more = torch.randn(2, 3)
    q.enqueue(more)
    restored.enqueue(more)
    torch.testing.assert_close(restored.keys, q.keys)


def test_queue_errors():
    with pytest.raises(ValueError, match="size"):
        FeatureQueue(size=0, dim=3)
    q = FeatureQueue(size=4, dim=3)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        q.enqueue(torch.randn(2, 4))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_rule_by_hand():
    source, target = _Net(), _Net()
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(1.0)
        for p in source.parameters():
            p.fill_(3.0)
        source.bn.running_mean.fill_(0.25)
        source.bn.num_batches_tracked.fill_(7)
    ema_update_(target, source, decay=0.9)
    for p in target.parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 0.9 * 1.0 + 0.1 * 3.0))
    assert target.bn.running_mean.tolist() == [0.25, 0.25]
    assert int(target.bn.num_batches_tracked) == 7
    ema_update_(target, source, decay=0.5)  # second update: 0.5 * 1.2 + 0.5 * 3 = 2.1
    torch.testing.assert_close(target.fc.weight.detach(), torch.full((2, 2), 2.1))
    for p in source.parameters():  # source untouched
        assert torch.all(p == 3.0)


def test_ema_extremes_and_errors():
    source = _Net()
    target = copy.deepcopy(source)
    with torch.no_grad():
        target.fc.weight.add_(1.0)
    frozen = copy.deepcopy(target)
    ema_update_(target, source, decay=1.0)
    torch.testing.assert_close(target.fc.weight, frozen.fc.weight)
    ema_update_(target, source, decay=0.0)
    torch.testing.assert_close(target.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(target, source, decay=1.5)
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(nn.Linear(2, 2), source, decay=0.9)


def test_queue_pickles_and_keeps_its_counters():
    import pickle

    q = FeatureQueue(size=4, dim=2)
    q.enqueue(torch.ones(3, 2))
    copy = pickle.loads(pickle.dumps(q))  # torch.save of a whole module pickles it
    assert copy.filled().shape == (3, 2)
    copy.enqueue(torch.zeros(2, 2))
    assert int(copy.ptr) == 1 and copy.filled().shape == (4, 2)
