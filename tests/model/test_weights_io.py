"""weights_io: safetensors headers read alone and checked against the file, shard indexes kept
inside the model folder, memory estimate in bytes."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.model import weights_io
from lmstack.model.weights_io import (MAX_HEADER_BYTES, available_memory, hf_weight_files, inside, read_header,
                                      read_headers, read_json, read_safetensors)
from lmstack.utils import LmstackError


def _raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_header_matches_safetensors(tmp_path):
    t = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.zeros(2, 2, dtype=torch.int64)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    h = read_header(tmp_path / "x.safetensors")
    assert set(h) == {"a", "b", "c"}                       # __metadata__ is not a tensor
    assert (h["a"].dtype, h["a"].shape, h["a"].nbytes) == ("F32", (3, 5), 60)
    assert (h["b"].dtype, h["b"].shape, h["b"].nbytes) == ("BF16", (7,), 14)
    assert (h["c"].dtype, h["c"].shape, h["c"].nbytes) == ("I64", (2, 2), 32)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_header_length_is_bounded_before_reading(tmp_path):
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + b"{}")       # claims 4 EiB of header
    with pytest.raises(LmstackError, match=f"declares a header of {2**62} bytes, but the file has 2 bytes.*at most "
                                           f"{MAX_HEADER_BYTES}"):
        read_header(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(LmstackError, match="too short for a safetensors header"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 9) + b"{not json")
    with pytest.raises(LmstackError, match="header is not valid JSON"):
        read_header(f)


@pytest.mark.parametrize("entry,needle", [
    ({"dtype": "F32", "shape": [10**12, 10**6], "data_offsets": [0, 4 * 10**18]}, r"outside the 16 data bytes"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 16]},
     r"shape \[3\] of F32 \(12 bytes\) but data_offsets span 16"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "not a list of non-negative ints"),
    ({"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "dtype 'Q4'"),
    ({"dtype": "F32", "shape": [4]}, "data_offsets None"),
])
def test_header_entries_checked_against_file_size(tmp_path, entry, needle):
    f = _raw(tmp_path / "x.safetensors", {"w": entry}, data=bytes(16))
    with pytest.raises(LmstackError, match=f"x.safetensors: header entry 'w' .*{needle}"):
        read_header(f)
    with pytest.raises(LmstackError, match="header entry 'w'"):
        read_safetensors(f)                                # checked before safetensors reads data


def test_tensor_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "1.safetensors"))
    save_file({"a": torch.zeros(2), "b": torch.zeros(1)}, str(tmp_path / "2.safetensors"))
    with pytest.raises(LmstackError, match="tensor 'a' is in both .*1.safetensors and .*2.safetensors"):
        read_headers([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "a/../../b.safetensors", "a\\..\\b",
                                  "C:/w.safetensors", "", 7])
def test_inside_refuses_paths_leaving_the_folder(tmp_path, name):
    with pytest.raises(LmstackError, match="index.json|not a file name"):
        inside(tmp_path, name, "index.json")


def test_shard_index(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m-1.safetensors"))
    (tmp_path / "sub").mkdir()
    save_file({"b": torch.zeros(2)}, str(tmp_path / "sub" / "m-2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "sub/m-2.safetensors",
                                                "c": "m-1.safetensors"}}))
    assert hf_weight_files(tmp_path) == [tmp_path / "m-1.safetensors", tmp_path / "sub" / "m-2.safetensors"]
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "../outside.safetensors"}}))
    with pytest.raises(LmstackError, match=r"weight_map points at '../outside.safetensors', outside the model folder"):
        hf_weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": str(tmp_path / "m-1.safetensors")}}))  # absolute, even if inside
    with pytest.raises(LmstackError, match="outside the model folder"):
        hf_weight_files(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "m-3.safetensors"}}))
    with pytest.raises(LmstackError, match=r"names shard\(s\) \['m-3.safetensors'\] that are not in"):
        hf_weight_files(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(LmstackError, match="no 'weight_map'"):
        hf_weight_files(tmp_path)


def test_read_json_bounded_and_typed(tmp_path, monkeypatch):
    f = tmp_path / "config.json"
    f.write_text("[1, 2]")
    with pytest.raises(LmstackError, match="holds a JSON list; a model config is a JSON object"):
        read_json(f, "model config")
    monkeypatch.setattr(weights_io, "MAX_JSON_BYTES", 4)
    with pytest.raises(LmstackError, match="config.json is 6 bytes; a model config is at most 4"):
        read_json(f, "model config")


def test_available_memory_is_in_bytes():
    have = available_memory()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # more than 256 MiB is free on any machine that runs this suite (a kB count would be ~1000x smaller)
    assert 2**28 < have <= total


def test_save_load_file_round_trip_through_write(tmp_path):
    t = {"x": torch.arange(6.0).reshape(2, 3)}
    weights_io.write_safetensors(tmp_path / "w.safetensors", t, {"format": "pt"})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], t["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]     # no temporary left behind
