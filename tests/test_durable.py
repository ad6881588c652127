"""fedvault.durable: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault import durable
from fedvault.client.keys import KeyStore
from fedvault.durable import atomic_write, fsync_dir, replace_dir


def _leftovers(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != name)


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The real ``os.fsync`` and ``os.replace``, recorded in order: what was flushed when."""
    seen: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        real_fsync(fd)
        seen.append(f"fsync {kind}")

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        seen.append("replace")

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    return seen


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o077)  # an odd umask must not change the modes asked for
    try:
        yield
    finally:
        os.umask(old)


# -- atomic_write -------------------------------------------------------------------------


@pytest.mark.usefixtures("umask")
def test_content_and_mode_whatever_the_umask(tmp_path: Path) -> None:
    secret, shared = tmp_path / "he-secret.ctx", tmp_path / "report.json"
    assert atomic_write(secret, b"\x00key\xff") is True
    assert atomic_write(shared, "résumé\n", 0o644) is True
    assert secret.read_bytes() == b"\x00key\xff"
    assert shared.read_bytes() == "résumé\n".encode()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600  # the default: secrets stay private
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    atomic_write(secret, b"", 0o600)
    assert secret.read_bytes() == b""
    assert _leftovers(tmp_path, "") == ["he-secret.ctx", "report.json"]


def test_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"old")
    path.chmod(0o600)
    atomic_write(path, b"new", 0o644)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the new file's mode, not the old one's
    assert _leftovers(tmp_path, path.name) == []


def test_overwrite_false_keeps_the_first_copy(tmp_path: Path) -> None:
    path = tmp_path / "round-000001.he"
    assert atomic_write(path, b"first", overwrite=False) is True
    assert atomic_write(path, b"second", overwrite=False) is False
    assert path.read_bytes() == b"first"
    assert atomic_write(path, b"third") is True
    assert path.read_bytes() == b"third"
    assert _leftovers(tmp_path, path.name) == []


def test_overwrite_false_loses_a_race_without_clobbering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process creates the file after the existence check, while this one writes.
    path = tmp_path / "job.json"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if not path.exists():
            path.write_bytes(b"the other process")

    monkeypatch.setattr(durable.os, "fsync", fsync)
    assert atomic_write(path, b"this process", overwrite=False) is False
    assert path.read_bytes() == b"the other process"
    assert _leftovers(tmp_path, path.name) == []


def test_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, events: list[str]
) -> None:
    atomic_write(tmp_path / "a", b"x")
    assert events == ["fsync file", "replace", "fsync dir"]
    events.clear()
    atomic_write(tmp_path / "b", b"x", overwrite=False)  # a hard link, not os.replace
    assert events == ["fsync file", "fsync dir"]


def test_fsync_false_renames_without_flushing(tmp_path: Path, events: list[str]) -> None:
    atomic_write(tmp_path / "scratch", b"x", fsync=False)
    assert events == ["replace"]
    assert (tmp_path / "scratch").read_bytes() == b"x"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    path = tmp_path / "sent.update"
    atomic_write(path, b"old")

    def fail(fd: int) -> None:
        raise exc

    monkeypatch.setattr(durable.os, "fsync", fail)
    with pytest.raises(type(exc)):
        atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path, path.name) == []


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.png"
    atomic_write(path, b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path, path.name) == []


def test_a_directory_in_the_way_or_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    in_the_way = tmp_path / "target"
    (in_the_way / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        atomic_write(in_the_way, b"x")
    assert (in_the_way / "inside").is_dir()
    assert _leftovers(tmp_path, "target") == []
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "file", b"x")
    assert not (tmp_path / "missing").exists()


def test_fsync_dir_flushes_a_directory_only(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")


def test_the_secret_key_is_written_durably_and_private(tmp_path: Path, events: list[str]) -> None:
    # The bug this module fixed: the HE secret key was renamed into place without
    # any fsync, so a power cut could leave a hospital without its key.
    class Secret:
        def serialize_secret(self) -> bytes:
            return b"secret context"

    path = KeyStore(tmp_path).put(3, Secret())  # type: ignore[arg-type]
    assert path.read_bytes() == b"secret context"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert events == ["fsync file", "replace", "fsync dir", "fsync dir"]  # + keys/ for epoch-3/
    assert _leftovers(path.parent, path.name) == []


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys, fedvault.durable; "
        "print(sorted(m for m in sys.modules if m.startswith('fedvault')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['fedvault', 'fedvault.durable']"


# -- replace_dir --------------------------------------------------------------------------


def test_replace_dir_moves_a_flushed_tree_into_place(tmp_path: Path, events: list[str]) -> None:
    src, dst = tmp_path / ".out.staging", tmp_path / "out"
    (src / "kits" / "h1").mkdir(parents=True)
    (src / "kits" / "h1" / "node.key").write_bytes(b"k")
    (src / "ca.pem").write_bytes(b"c")
    os.mkfifo(src / "fifo")  # neither opened nor flushed (an open would block)
    dst.mkdir()  # an empty directory is replaced too
    assert replace_dir(src, dst) == dst
    assert (dst / "kits" / "h1" / "node.key").read_bytes() == b"k"
    assert (dst / "ca.pem").read_bytes() == b"c"
    assert not src.exists()
    assert events.count("fsync file") == 2
    assert events.count("fsync dir") == 4  # h1, kits, the staging folder, and the parent after
    assert events[-2:] == ["replace", "fsync dir"]


def test_replace_dir_never_clobbers_a_non_empty_directory(tmp_path: Path) -> None:
    src, dst = tmp_path / ".out.staging", tmp_path / "out"
    src.mkdir()
    (src / "new").write_bytes(b"new")
    dst.mkdir()
    (dst / "old").write_bytes(b"old")
    with pytest.raises(OSError):
        replace_dir(src, dst)
    assert (dst / "old").read_bytes() == b"old" and not (dst / "new").exists()
    assert (src / "new").read_bytes() == b"new"  # left for the caller to remove


# -- the crash test -----------------------------------------------------------------------

_SIZE = 4 << 20  # 4 MiB: a write takes long enough that most kills land in the middle of one
_HEADER = 16  # b"GEN%012d\n"

# The child replaces the file in a loop with self-describing payloads: a header with
# the generation, a body of that generation's byte, and the SHA-256 of both.
_CHILD = """
import hashlib, sys
from fedvault.durable import atomic_write

path, gen, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
while True:
    gen += 1
    data = b"GEN%012d\\n" % gen + bytes([gen % 256]) * size
    atomic_write(path, data + hashlib.sha256(data).digest())
"""


def _payload(gen: int) -> bytes:
    data = b"GEN%012d\n" % gen + bytes([gen % 256]) * _SIZE
    return data + hashlib.sha256(data).digest()


def _generation(content: bytes) -> int:
    """The generation of one whole payload; fails on anything else (empty, torn, mixed)."""
    assert len(content) == _HEADER + _SIZE + 32, f"torn file: {len(content)} bytes"
    data, digest = content[:-32], content[-32:]
    assert hashlib.sha256(data).digest() == digest, "torn file: the digest does not match"
    assert data[:3] == b"GEN"
    return int(data[3:_HEADER])


def test_a_killed_writer_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of its writes, 20 times: the file is always one
    whole payload, and each kill leaves at most one temporary file (see fedvault.durable:
    leftovers are harmless and not cleaned automatically; here they are removed by hand).

    A kill tests atomicity (the rename); durability across a power cut rests on the
    fsyncs, checked above.
    """
    path = tmp_path / "he-secret.ctx"
    atomic_write(path, _payload(0))
    gen, rng, interrupted = 0, random.Random(), 0
    for _ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), str(gen), str(_SIZE)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.communicate()[1].decode(errors="replace")
            with contextlib.suppress(subprocess.TimeoutExpired):  # it runs on: kill it
                child.wait(timeout=rng.uniform(0.02, 0.3))
            child.send_signal(signal.SIGKILL)
            _, err = child.communicate()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err.decode(errors="replace")
        after = _generation(path.read_bytes())
        assert after >= gen  # the old file or a newer one, never an older one
        gen = after
        leftovers = _leftovers(tmp_path, path.name)
        assert len(leftovers) <= 1, leftovers
        for name in leftovers:
            assert name.startswith(f".{path.name}.") and name.endswith(".tmp")
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
            (tmp_path / name).unlink()
            interrupted += 1
    assert gen > 0, "the writer never finished a write"
    assert interrupted > 0, "no kill landed in the middle of a write: nothing was tested"
