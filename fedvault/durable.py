"""Durable file replacement: a crash leaves the old file or the new one, never half of one.

Every file fedvault writes that must survive a crash or a power cut (a hospital's
HE secret key, its archived global models, the replies it released, its site
policy, the coordinator's report) goes through :func:`atomic_write`; a directory
built whole (a model export, a consortium's kits) is moved into place with
:func:`replace_dir`.

Why each step is needed:

* the bytes go to a temporary file in the *same* directory (a rename across file
  systems is not atomic), so a reader never sees a partly written target;
* ``fsync`` of the temporary file before the rename: without it the rename can
  reach the disk before the data, and a power cut leaves an empty or truncated
  file under the final name (the classic ext4 ``delalloc`` zero-length file);
* :func:`os.replace` swaps the name atomically: the target is the old file or the
  new one, never a mixture;
* ``fsync`` of the directory after the rename: the rename is a change to the
  directory, and until the directory is on disk a power cut can undo it (and a
  newly created file can vanish altogether).

A process killed in the middle of a write (``SIGKILL``, a power cut) can leave
its temporary file behind: a hidden ``.NAME.XXXXXXXX.tmp`` beside the target,
at most one per interrupted write, created with mode 0600 whatever the target's
mode. No reader ever opens it, and the target is intact, so it is harmless; it
is not cleaned up automatically, because another process may be writing the
same target at that moment and its temporary file looks the same. Delete such
leftovers by hand when nothing is writing.

This module imports only the standard library: every layer (client,
coordinator, the CLI) may use it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "replace_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush directory ``path`` itself, so a rename or a new name in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str,
    mode: int = 0o600,
    *,
    fsync: bool = True,
    overwrite: bool = True,
) -> bool:
    """Replace ``path`` with ``data`` all at once, durably; return whether it was written.

    Parameters
    ----------
    path
        The target file. Its directory must exist (it is not created).
    data
        The whole new content; a ``str`` is encoded as UTF-8.
    mode
        The permission bits of the new file, whatever the umask: the default
        0600 suits secrets (keys, hospital state); pass 0o644 for files meant
        to be shared (a report, a policy). The temporary file is created
        0600 and given ``mode`` before any byte is written to it.
    fsync
        Flush the file and its directory to disk (see the module docstring).
        ``False`` keeps the atomic rename but not the durability; for tests and
        scratch files only.
    overwrite
        With ``False`` an existing ``path`` is kept, even when another process
        creates it while this one writes (the first copy wins), and ``False``
        is returned.

    Returns
    -------
    bool
        ``True`` when ``data`` is now at ``path``; ``False`` only with
        ``overwrite=False`` when ``path`` already existed.

    Raises
    ------
    OSError
        Anything the file system refuses (no directory, no space, a directory
        in the way). The temporary file is removed and ``path`` is left as it
        was.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not overwrite and path.exists():
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), stat.S_IMODE(mode))  # before the fsync: the mode is durable too
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        elif not _link_no_clobber(tmp, path):
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # gone already after a successful replace
    if fsync:
        fsync_dir(path.parent)
    return True


def _link_no_clobber(tmp: str, path: Path) -> bool:
    """Give the finished ``tmp`` the name ``path`` unless ``path`` exists.

    The caller removes ``tmp``.
    """
    try:
        os.link(tmp, path)  # atomic and never clobbers: the first copy wins
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            return False
        os.replace(tmp, path)
    return True


def replace_dir(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, fsync: bool = True
) -> Path:
    """Move the finished directory ``src`` onto ``dst`` (missing or empty) in one rename.

    Every file and directory under ``src`` is flushed first, then ``src`` is
    renamed to ``dst`` with :func:`os.replace` (atomic on POSIX, and it fails
    rather than clobber a non-empty ``dst``), then ``dst``'s parent is flushed,
    so after a crash ``dst`` is missing (or empty) or complete. ``src`` must be
    on the same file system as ``dst``: build it in a hidden sibling.

    Returns ``dst``; raises :class:`OSError` as the file system does (``src``
    is then left where it was, for the caller to remove).
    """
    src, dst = Path(src), Path(dst)
    if fsync:
        for root, _dirs, files in os.walk(src, topdown=False):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(root)
    os.replace(src, dst)
    if fsync:
        fsync_dir(dst.parent)
    return dst


def _fsync_file(path: Path) -> None:
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return  # a link's target is not ours to flush; a FIFO would block the open
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
