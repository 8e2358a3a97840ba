import os
import signal
import subprocess
import sys

import pytest

from lmstack.utils import LmstackError, atomic_dir, atomic_write_text


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temp files left


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as t:
        (t / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as t:
            (t / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (d / "a").read_text() == "1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


def test_sigkill_during_write_leaves_old_file(tmp_path):
    p = tmp_path / "big.bin"
    atomic_write_text(p, "good")
    code = ("import sys,os;from lmstack.utils import io;"
            "orig=os.fsync\n"
            "def slow(fd):\n  os.kill(os.getpid(), 9)\n"
            "os.fsync=slow\n"
            f"io.atomic_write_bytes({str(p)!r}, b'x'*10_000_000)")
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    assert p.read_text() == "good"


def test_unwritable_parent_is_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
        pytest.skip("root ignores directory permissions")
    with pytest.raises(LmstackError, match="not writable"):
        atomic_write_text(ro / "x", "y")


def test_ensure_writable_dir_creates_and_rejects_a_file(tmp_path):
    from lmstack.utils import ensure_writable_dir
    d = ensure_writable_dir(tmp_path / "a" / "b", "choose another --out")
    assert d.is_dir() and list(d.iterdir()) == []  # the scratch file is gone
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LmstackError, match="is a file.*choose another --out"):
        ensure_writable_dir(f, "choose another --out")
    with pytest.raises(LmstackError, match="not writable.*choose another --out"):
        ensure_writable_dir(f / "sub", "choose another --out")  # parent is a file


def test_atomic_writes_honour_the_umask(tmp_path):
    """mkstemp/mkdtemp create 0o600/0o700; the rename must not leave run files private."""
    import os
    import stat

    from lmstack.utils import atomic_dir, atomic_write_bytes
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_bytes(b"y")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
