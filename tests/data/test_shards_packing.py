"""Token shards round-trip and are validated; the packed sampler is deterministic, resumable and
gives DDP ranks disjoint windows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.data import PackedSampler, ShardSet, iter_texts, write_shards
from lmstack.data.shards import tokenizer_fingerprint
from lmstack.utils.errors import LmstackError


@pytest.fixture
def shard_dir(tw_dir, byte_tok, tmp_path):
    import shutil
    d = tmp_path / "data"
    shutil.copytree(tw_dir, d)
    write_shards(d, byte_tok, splits=("train", "val"))
    return d


def test_shards_round_trip_to_the_token_ids(shard_dir, byte_tok):
    meta = json.loads((shard_dir / "shards" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eot_token"] == 256 and meta["vocab_size"] == 257
    for split in ("train", "val"):
        ds = ShardSet(shard_dir / "shards", split)
        want = []
        for text in iter_texts(shard_dir, split):
            want += [256] + byte_tok.encode_ordinary(text)
        assert ds.tokens.tolist() == want and len(ds) == len(want) == meta["splits"][split]["tokens"]
        # documents come back exactly when cut at EOT
        docs = [byte_tok.decode(d) for d in np.split(ds.tokens, np.flatnonzero(ds.tokens == 256))[1:]]
        assert docs == list(iter_texts(shard_dir, split))


def test_uint32_for_large_vocab_and_window_across_shards(tw_dir, tmp_path, monkeypatch, byte_tok):
    import shutil

    import lmstack.data.shards as shards_mod

    class BigTok(type(byte_tok)):
        n_vocab, eot_token = 70_000, 69_999

    d = tmp_path / "d"
    shutil.copytree(tw_dir, d)
    monkeypatch.setattr(shards_mod, "SHARD_TOKENS", 5000)       # force several files
    meta = write_shards(d, BigTok(), splits=("val",))
    assert meta["dtype"] == "uint32" and len(meta["splits"]["val"]["files"]) > 2
    ds = ShardSet(d, "val")                                       # the data dir itself works too
    flat = ds.tokens
    assert flat.dtype == np.uint32 and flat[0] == 69_999
    edge = int(ds.offsets[1])
    assert ds.window(edge - 3, 10).tolist() == flat[edge - 3: edge + 7].tolist()
    s = PackedSampler(ds, batch_size=2, seq_len=32, seed=0)
    x, y = s.next_batch()
    assert x.shape == (2, 32) and x.dtype == torch.long


def test_sampler_is_packed_shifted_and_deterministic(shard_dir):
    ds = ShardSet(shard_dir / "shards", "train")
    a, b = PackedSampler(ds, batch_size=4, seq_len=64, seed=7), PackedSampler(ds, batch_size=4, seq_len=64, seed=7)
    flat = ds.tokens.astype(np.int64)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == ya.shape == (4, 64) and xa.dtype == torch.long
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        for row_x, row_y in zip(xa.numpy(), ya.numpy()):      # every row is a slice of the stream
            start = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(flat, 65)[:, :4].__eq__(
                np.r_[row_x[:3], row_y[2]]).all(1))
            assert any((flat[s:s + 64] == row_x).all() and (flat[s + 1:s + 65] == row_y).all() for s in start)
    c = PackedSampler(ds, batch_size=4, seq_len=64, seed=8)
    assert not torch.equal(c.next_batch()[0], PackedSampler(ds, batch_size=4, seq_len=64, seed=7).next_batch()[0])


def test_resume_yields_exactly_the_uninterrupted_batches(shard_dir):
    ds = ShardSet(shard_dir / "shards", "val")
    ref = PackedSampler(ds, batch_size=4, seq_len=32, seed=3)
    n = ref.steps_per_epoch * 2 + 3                                  # crosses two epoch boundaries
    want = [ref.next_batch() for _ in range(n)]
    for cut in (1, ref.steps_per_epoch, ref.steps_per_epoch + 2):
        s = PackedSampler(ds, batch_size=4, seq_len=32, seed=3)
        for _ in range(cut):
            s.next_batch()
        sd = json.loads(json.dumps(s.state_dict()))                  # survives a JSON checkpoint
        fresh = PackedSampler(ds, batch_size=4, seq_len=32, seed=3)
        fresh.load_state_dict(sd)
        for i in range(cut, n):
            x, y = fresh.next_batch()
            assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1]), (cut, i)
    with pytest.raises(LmstackError, match="seq_len"):
        PackedSampler(ds, batch_size=4, seq_len=16, seed=3).load_state_dict(sd)


def test_ddp_ranks_read_disjoint_windows_covering_the_single_process_batch(shard_dir):
    ds = ShardSet(shard_dir / "shards", "train")
    single = PackedSampler(ds, batch_size=6, seq_len=32, seed=1)
    ranks = [PackedSampler(ds, batch_size=3, seq_len=32, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x = single.next_batch()[0]
        parts = [r.next_batch()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
        rows = {tuple(row.tolist()) for p in parts for row in p}
        assert len(rows) == 6


def test_bad_shards_fail_with_one_line_errors(shard_dir, byte_tok):
    sd = shard_dir / "shards"
    with pytest.raises(LmstackError, match="split 'test' has no shards"):
        ShardSet(sd, "test")
    with pytest.raises(LmstackError, match="fewer than one batch"):
        PackedSampler(ShardSet(sd, "val"), batch_size=10_000, seq_len=512)
    class OtherTok(type(byte_tok)):
        def encode_ordinary(self, text):
            return list(text.encode("utf-8"))[::-1]
    assert tokenizer_fingerprint(OtherTok()) != tokenizer_fingerprint(byte_tok)
    ShardSet(sd, "train").check_tokenizer(byte_tok)
    with pytest.raises(LmstackError, match="differs from the one the shards were written with"):
        ShardSet(sd, "train").check_tokenizer(OtherTok())
    # truncated: one byte short of whole uint16 tokens
    f = sd / "val_0000.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    with pytest.raises(LmstackError, match="truncated or foreign"):
        ShardSet(sd, "val")
    f.write_bytes(data + b"\0\0")                       # whole tokens, but not what meta.json says
    with pytest.raises(LmstackError, match="truncated or foreign"):
        ShardSet(sd, "val")
    f.write_bytes(data)
    meta = json.loads((sd / "meta.json").read_text())
    (sd / "meta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(LmstackError, match="not an lmstack shard index"):
        ShardSet(sd, "val")
    (sd / "meta.json").write_text("{not json")
    with pytest.raises(LmstackError, match="not valid JSON"):
        ShardSet(sd, "val")
    (sd / "meta.json").unlink()
    with pytest.raises(LmstackError, match="write shards first"):
        ShardSet(sd, "val")


def test_tokenizer_without_eot_is_rejected_before_writing(tw_dir, byte_tok):
    class NoEot(type(byte_tok)):
        eot_token = None
    with pytest.raises(LmstackError, match="no <\\|endoftext\\|> token"):
        write_shards(tw_dir, NoEot())
    assert not (tw_dir / "shards").exists()
