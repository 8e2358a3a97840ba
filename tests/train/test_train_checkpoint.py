"""Checkpoint format: tensors in safetensors, the rest in JSON, no pickle; atomic; keep last N."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.train import checkpoint as ckpt
from lmstack.utils import LmstackError


def test_flatten_roundtrip_of_optimizer_and_rng_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], fused=True)
    p.grad = torch.randn(3, 2)
    opt.step()
    np.random.seed(3)
    np.random.rand(5)
    state = {"opt": opt.state_dict(), "rng": ckpt.rng_state(), "gen": torch.Generator().manual_seed(5).get_state()}
    tensors, skeleton = ckpt.flatten_state(state)
    text = json.dumps(skeleton)                            # the skeleton is plain JSON
    back = ckpt.unflatten_state(json.loads(text), tensors)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert list(back["opt"]["state"]) == [0]               # int keys survive
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)   # tuples survive
    a, b = back["rng"]["numpy"], state["rng"]["numpy"]
    assert a[0] == b[0] and a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
    assert back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["gen"], state["gen"])
    # restoring the RNG state replays the same draws
    ckpt.set_rng_state(back["rng"])
    draws = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state["rng"])
    assert draws == (random.random(), np.random.rand(), torch.rand(1))


def test_flatten_rejects_objects():
    with pytest.raises(TypeError, match="cannot store a object"):
        ckpt.flatten_state({"x": object()})


def _save(root, step, keep=2):
    emb = torch.randn(4, 3)
    model = {"wte.weight": emb, "lm_head.weight": emb, "b": torch.zeros(2)}   # tied, like the model
    return ckpt.save_checkpoint(root, step, model, {"n": step, "t": torch.full((2,), float(step))},
                                {"hello": "world"}, keep_last=keep)


def test_save_load_keep_last(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    weights, state, meta = ckpt.load_checkpoint(tmp_path / "step_0000003")
    assert meta["hello"] == "world" and meta["step"] == 3 and state["n"] == 3
    assert torch.equal(weights["lm_head.weight"], weights["wte.weight"])   # alias restored
    assert sorted(p.name for p in (tmp_path / "step_0000003").iterdir()) == \
        ["model.safetensors", "state.json", "state.safetensors"]


def test_failed_write_leaves_previous_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full_disk(tensors, path, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(LmstackError, match="No space left.*previous checkpoint is intact"):
        _save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    ckpt.load_checkpoint(tmp_path / "step_0000001")


def test_recover_after_kill(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / ".step_0000002.abc.tmp").mkdir()                        # killed while building
    (tmp_path / "step_0000001").rename(tmp_path / ".step_0000001.old")   # killed mid-replacement
    ckpt.recover(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    (path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(LmstackError, match="damaged"):
        ckpt.load_checkpoint(path)


def test_full_disk_in_safetensors_is_the_same_one_line_error(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own SafetensorError, which is no OSError."""
    from safetensors import SafetensorError
    _save(tmp_path, 1)

    def full_disk(tensors, path, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })\nmore detail')
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(LmstackError) as e:
        _save(tmp_path, 2)
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    assert msg.startswith(f"could not write checkpoint {tmp_path / 'step_0000002'}: Error while serializing")
    assert "No space left on device" in msg and msg.endswith("the previous checkpoint is intact; free disk space "
                                                             "or choose another --out")
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]


def test_kill_while_pruning_leaves_no_orphan(tmp_path, monkeypatch):
    """Pruning renames a checkpoint to a trash name before deleting it: a kill in the middle
    of the delete leaves a trash dir (never a half-deleted step_N), which recover() removes."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):           # delete one file, then the process "dies"
        (Path(path) / "state.json").unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)                      # keep_last=2: prunes step 1
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0].startswith(".step_0000001.") and names[0].endswith(".trash") and names[1:] == \
        ["step_0000002", "step_0000003"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]


def test_recover_removes_half_deleted_step_dirs(tmp_path):
    """The state an older lmstack left when killed inside rmtree: a step dir with some files
    gone. It is never resumed from or pruned, so recover() must remove it; complete ones stay."""
    for s in (1, 2, 3):
        _save(tmp_path, s, keep=0)
    (tmp_path / "step_0000001" / "state.json").unlink()          # weights, no state
    (tmp_path / "step_0000002" / "model.safetensors").unlink()   # state, no weights
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003"]
    ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003"]
    ckpt.load_checkpoint(tmp_path / "step_0000003")
