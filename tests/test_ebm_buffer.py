"""Replay buffer: capacity, distinct draws, re-initialisation rate, checkpoint round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from genmodels.ebm import ReplayBuffer


def _buffer(capacity: int = 100, p: float = 0.05, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, (3, 4), p, generator=torch.Generator().manual_seed(seed))


def test_capacity_and_uniform_init() -> None:
    buf = _buffer(100)
    assert len(buf) == 100 and buf.examples.shape == (100, 3, 4)
    assert buf.examples.min() >= 0 and buf.examples.max() <= 1
    # Uniform(0, 1): mean 1/2 with standard error sqrt(1/12 / 1200).
    assert abs(buf.examples.mean().item() - 0.5) < 4.5 * math.sqrt(1 / 12 / 1200)
    with pytest.raises(ValueError):
        buf.sample(101)


def test_sample_draws_distinct_chains_and_push_writes_back() -> None:
    buf = _buffer(50, p=0.0)
    x, idx = buf.sample(50)
    assert idx.unique().numel() == 50  # a permutation: every chain exactly once
    assert torch.equal(x, buf.examples[idx])  # p = 0: no restarts
    buf.push(idx, torch.full_like(x, 7.0))
    assert torch.equal(buf.examples, torch.full_like(buf.examples, 7.0))
    x2, _ = buf.sample(10)
    x2 += 1  # the draw is a copy: editing it leaves the buffer alone
    assert torch.equal(buf.examples, torch.full_like(buf.examples, 7.0))
    with pytest.raises(ValueError):
        buf.push(idx[:3], torch.zeros(3, 5))


def test_reinit_fraction_is_binomial() -> None:
    p, n, draws = 0.05, 2000, 10
    buf = _buffer(4000, p=p)
    restarted = 0
    for _ in range(draws):
        # Mark every chain as "old" (outside the noise range) so restarted ones stand out.
        buf.push(torch.arange(4000), torch.full((4000, 3, 4), 2.0))
        x, idx = buf.sample(n)
        fresh = (x <= 1.0).all(dim=(1, 2))
        assert ((x == 2.0).all(dim=(1, 2)) | fresh).all()
        restarted += int(fresh.sum())
    total = n * draws
    sd = math.sqrt(total * p * (1 - p))
    assert abs(restarted - total * p) < 4.5 * sd, (restarted, total * p, sd)


def test_reinitialize_slice() -> None:
    buf = _buffer(200)
    buf.push(torch.arange(200), torch.full((200, 3, 4), 2.0))
    idx = buf.reinitialize(0.25)
    assert idx.numel() == 50 and idx.unique().numel() == 50
    fresh = (buf.examples <= 1.0).all(dim=(1, 2))
    assert fresh.sum() == 50 and fresh[idx].all()


def test_state_dict_round_trip_through_weights_only_checkpoint() -> None:
    buf = _buffer(64, p=0.3, seed=1)
    for _ in range(3):
        x, idx = buf.sample(16)
        buf.push(idx, x * 0.5)
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    other = _buffer(64, p=0.05, seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.examples, buf.examples) and other.reinit_prob == 0.3
    # Same chains and same generator state: the continuations are identical.
    a, ia = buf.sample(16)
    b, ib = other.sample(16)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    with pytest.raises(ValueError):
        ReplayBuffer(32, (3, 4)).load_state_dict(state)
