"""`lmstack data build` and `lmstack data stats` end to end on a small tinyworld, with the real
tokenizer, plus the CLI's one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack.cli.main import main
from lmstack.data import PackedSampler, ShardSet, iter_texts


def test_build_then_stats(tmp_path, capsys):
    from lmstack.tokenizer import Tokenizer

    out = tmp_path / "tw"
    rc = main(["data", "build", "--corpus", "tinyworld", "--out", str(out), "--size-mb", "0.15", "--seed", "1",
               "--dedupe", "--vocab-size", "600"])
    assert rc == 0
    assert "duplicates removed" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["dedupe"] is True and meta["documents"]["removed"] > 0
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.n_vocab <= 600
    ds = ShardSet(out / "shards", "train")
    ds.check_tokenizer(tok)
    want = []
    for t in iter_texts(out, "train"):
        want += [tok.eot_token] + tok.encode_ordinary(t)
    assert np.array_equal(ds.tokens, np.array(want))
    x, _ = PackedSampler(ds, batch_size=2, seq_len=32).next_batch()
    assert x.max() < tok.n_vocab
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("documents", "tokens", "duplicates", "train", "val", "test", "-- arithmetic:", "-- reverse:",
                   "-- facts:", "eval", "kb"):
        assert needle in text
    # reuse the saved tokenizer for another build
    rc = main(["data", "build", "--corpus", "tinyworld", "--out", str(tmp_path / "tw2"), "--size-mb", "0.05",
               "--tokenizer", str(out / "tokenizer.json")])
    assert rc == 0
    assert ShardSet(tmp_path / "tw2", "val").tokenizer_fingerprint == ds.tokenizer_fingerprint


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nope.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.json not found" in err
    assert not (tmp_path / "x").exists()                  # failed before any work
    assert main(["data", "build", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "build", "--out", str(tmp_path / "z"), "--noise", "2"]) == 1
    assert "noise must be a probability" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 1
    assert "not a data directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "build", "--out", "x", "--size-mbs", "1"])
