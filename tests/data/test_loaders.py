"""Loaders: seeded determinism, rank slicing == global batch, stream continuity and resets, eval windows."""

import pytest
import torch

from hierseq.data import RandomWindowLoader, StreamLoader, eval_windows

TOKENS = torch.arange(1000) % 256  # position i holds i % 256: windows are easy to locate


def test_random_loader_shift_and_determinism():
    a = RandomWindowLoader(TOKENS, batch_size=4, seq_len=16, seed=3)
    b = RandomWindowLoader(TOKENS, batch_size=4, seq_len=16, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])  # labels are inputs shifted by one
        assert torch.equal(ya[:, -1], (xa[:, -1] + 1) % 256)  # contiguous window of seq_len + 1
    c = RandomWindowLoader(TOKENS, batch_size=4, seq_len=16, seed=4)
    assert not torch.equal(c.next_batch()[0], RandomWindowLoader(TOKENS, 4, 16, seed=3).next_batch()[0])


def test_random_loader_rank_slices_equal_global_batch():
    single = RandomWindowLoader(TOKENS, batch_size=8, seq_len=8, seed=0)
    ranks = [RandomWindowLoader(TOKENS, batch_size=8, seq_len=8, seed=0, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(p[0].shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_random_loader_state_resume():
    a = RandomWindowLoader(TOKENS, 4, 8, seed=1)
    for _ in range(2):
        a.next_batch()
    state = a.state_dict()
    assert state["generator_state"].dtype == torch.uint8 and state["step"] == 2
    expected = [a.next_batch()[0] for _ in range(3)]
    b = RandomWindowLoader(TOKENS, 4, 8, seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch()[0], e) for e in expected)
    with pytest.raises(ValueError, match="seq_len=8"):
        RandomWindowLoader(TOKENS, 4, 16, seed=1).load_state_dict(state)


def test_stream_loader_continuity_and_resets():
    # 4 streams of 250 tokens; L = 10 -> (250 - 1) // 10 = 24 batches per pass.
    loader = StreamLoader(TOKENS, batch_size=4, seq_len=10)
    assert loader.batches_per_pass == 24
    x0, y0, r0 = loader.next_batch()
    assert r0 is True
    assert x0[:, 0].tolist() == [0, 250 % 256, 500 % 256, 750 % 256]
    prev_x, prev_y = x0, y0
    resets = []
    for _ in range(30):
        x, y, reset = loader.next_batch()
        resets.append(reset)
        if not reset:
            # row b continues exactly where it ended: the first input is the previous last label
            assert torch.equal(x[:, 0], prev_y[:, -1])
            assert torch.equal(x[:, 0], (prev_x[:, -1] + 1) % 256)
        else:
            assert torch.equal(x, x0)  # wrapped back to the stream starts
        prev_x, prev_y = x, y
    assert [i for i, r in enumerate(resets) if r] == [23]  # batch 24 (0-based) starts pass 2


def test_stream_loader_ranks_and_state():
    single = StreamLoader(TOKENS, batch_size=4, seq_len=10)
    r1 = StreamLoader(TOKENS, batch_size=4, seq_len=10, rank=1, world_size=2)
    for _ in range(3):
        x, _, reset = single.next_batch()
        x1, _, reset1 = r1.next_batch()
        assert torch.equal(x1, x[2:]) and reset == reset1
    state = single.state_dict()
    fresh = StreamLoader(TOKENS, batch_size=4, seq_len=10)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_batch()[0], single.next_batch()[0])


def test_eval_windows_cover_split():
    tokens = torch.arange(101)
    batches = list(eval_windows(tokens, batch_size=3, seq_len=10))
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    assert torch.equal(inputs.flatten(), torch.arange(100))  # non-overlapping, contiguous, complete
    assert torch.equal(labels.flatten(), torch.arange(1, 101))
    # max_batches spreads the kept windows over the whole split
    limited = list(eval_windows(tokens, batch_size=2, seq_len=10, max_batches=1))
    assert len(limited) == 1 and limited[0][0][:, 0].tolist() == [0, 50]


def test_loader_errors():
    short = torch.arange(16)
    with pytest.raises(ValueError, match=r"needs at least seq_len \+ 1 = 17"):
        RandomWindowLoader(short, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"need at least seq_len \+ 1 = 9"):
        StreamLoader(short, batch_size=4, seq_len=8)
    with pytest.raises(ValueError, match="divisible by world_size=2"):
        RandomWindowLoader(TOKENS, 3, 8, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        StreamLoader(TOKENS, 4, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"needs at least seq_len \+ 1 = 17"):
        list(eval_windows(short, 2, 16))
    with pytest.raises(ValueError, match="batch_size=0"):
        RandomWindowLoader(TOKENS, 0, 8, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        RandomWindowLoader(torch.zeros(4, 4, dtype=torch.long), 1, 2, seed=0)
