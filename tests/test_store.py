"""The token store (memory-mapped shards) and the step sampler that reads it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ablate.config import ConfigError
from ablate.data.store import SplitReader, TokenStore, code_dtype
from ablate.data.stream import StepSampler

INFO = {"data": "d1", "tokenizer": "t1", "grid": [2, 3], "codebook_size": 1000}


def _shards(store: TokenStore, sizes: list[int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    codes, caps = [], []
    for i, n in enumerate(sizes):
        c = rng.integers(0, 1000, size=(n, 6))
        t = [f"caption {i}-{j} ü" + "x" * int(rng.integers(0, 5)) for j in range(n)]
        store.write("train", i, c, t)
        codes.append(c)
        caps += t
    return np.concatenate(codes), caps


def test_gather_across_shards_returns_the_rows_written(tmp_path):
    store = TokenStore(tmp_path / "s", INFO)
    codes, caps = _shards(store, [5, 1, 7])
    r = store.split("train")
    assert len(r) == 13 and r.tokens == 6
    idx = torch.tensor([12, 0, 5, 6, 4, 5, 11])  # unsorted, repeated, every shard
    assert torch.equal(r.codes(idx), torch.from_numpy(codes[idx.numpy()]))
    assert r.captions(idx) == [caps[i] for i in idx.tolist()]
    assert list(r.iter_captions(chunk=4)) == caps
    assert np.load(tmp_path / "s" / "train" / "shard-00000" / "codes.npy").dtype == np.uint16
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.int32


def test_limit_and_out_of_range(tmp_path):
    store = TokenStore(tmp_path / "s", INFO)
    codes, _ = _shards(store, [4, 4])
    r = store.split("train", limit=6)
    assert len(r) == 6
    assert torch.equal(r.codes([5]), torch.from_numpy(codes[[5]]))
    with pytest.raises(IndexError):
        r.codes([6])


def test_half_written_shard_is_invisible_and_finished_shard_never_rewritten(tmp_path):
    store = TokenStore(tmp_path / "s", INFO)
    codes, _ = _shards(store, [3])
    # a writer killed mid-shard leaves a temporary directory: not a shard
    junk = tmp_path / "s" / "train" / ".shard-00001.abc"
    junk.mkdir()
    (junk / "codes.npy").write_bytes(b"partial")
    assert not store.done("train", 1) and len(store.split("train")) == 3
    # writing shard 0 again keeps the first copy
    store.write("train", 0, np.zeros((2, 6), dtype=np.int64), ["a", "b"])
    assert torch.equal(store.split("train").codes([0, 1, 2]), torch.from_numpy(codes))
    assert store.progress("train", 2) == (1, 2)


def test_store_of_another_tokenizer_is_refused(tmp_path):
    TokenStore(tmp_path / "s", INFO)
    with pytest.raises(ConfigError, match="tokenizer='t1'.*'t2'"):
        TokenStore(tmp_path / "s", {**INFO, "tokenizer": "t2"})


def test_bad_codes_are_refused(tmp_path):
    store = TokenStore(tmp_path / "s", INFO)
    with pytest.raises(ValueError, match="outside"):
        store.write("train", 0, np.full((1, 6), 1000), ["a"])
    with pytest.raises(ValueError, match="captions"):
        store.write("train", 0, np.zeros((2, 6)), ["a"])
    with pytest.raises(FileNotFoundError, match="ablate prepare"):
        SplitReader(tmp_path / "s", "val")


def test_sampler_epochs_are_permutations_and_ranks_partition_the_batch():
    s = StepSampler(n=50, batch_size=10, seed=3)
    epoch0 = torch.cat([s.indices(k) for k in range(5)])
    assert sorted(epoch0.tolist()) == list(range(50))
    assert not torch.equal(epoch0, torch.cat([s.indices(k) for k in range(5, 10)]))
    # a batch straddling two epochs (n not a multiple of B)
    t = StepSampler(n=7, batch_size=4, seed=0)
    seen = torch.cat([t.indices(k) for k in range(7)])  # 28 = 4 epochs
    for e in range(4):
        assert sorted(seen[e * 7:(e + 1) * 7].tolist()) == list(range(7))
    # pure function of the step: a fresh sampler (a resumed job) reads the same batch
    assert torch.equal(StepSampler(50, 10, 3).indices(7), s.indices(7))
    # two ranks read disjoint halves whose union is the single-process batch
    r0, r1 = s.indices(7, rank=0, world=2), s.indices(7, rank=1, world=2)
    assert sorted(torch.cat([r0, r1]).tolist()) == sorted(s.indices(7).tolist())
    assert not set(r0.tolist()) & set(r1.tolist())
