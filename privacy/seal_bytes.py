"""SEAL objects to bytes and back.

TenSEAL's binding of SEAL (``tenseal.sealapi``) saves and loads ciphertexts
only through file paths, and its own vector types do not expose SEAL's
seed-compressed symmetric ciphertexts, which halve the upload. So ciphertexts
go through one private scratch directory per process, on tmpfs where the
machine has one: SEAL still does all (de)serialization and every validity
check of a loaded ciphertext. Only ciphertexts pass through here, never a key
or a plaintext.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Protocol

import tenseal.sealapi as sealapi

__all__ = ["Savable", "dump", "load_ciphertext"]

_lock = threading.Lock()
_dir: Path | None = None


def _scratch() -> Path:
    global _dir
    with _lock:
        if _dir is None or not _dir.exists():
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            _dir = Path(tempfile.mkdtemp(prefix="fedvault-seal-", dir=base))
            atexit.register(shutil.rmtree, _dir, True)
        return _dir


def _path() -> Path:
    # One file per thread, overwritten by each call and removed at exit: no
    # per-chunk unlink on the coordinator's hot path.
    return _scratch() / f"{os.getpid()}-{threading.get_ident()}"


class Savable(Protocol):
    """A SEAL object that saves itself to a file path (a ciphertext, a ``Serializable``)."""

    def save(self, path: str, /) -> None:
        """Write the object to ``path``."""
        ...


def dump(obj: Savable) -> bytes:
    """Serialize a SEAL ciphertext (or seed-compressed ``Serializable``) to bytes."""
    path = _path()
    obj.save(str(path))
    return path.read_bytes()


def load_ciphertext(seal_context: sealapi.SEALContext, data: bytes) -> sealapi.Ciphertext:
    """Load a ciphertext, letting SEAL check it against ``seal_context``.

    Raises whatever SEAL raises (``ValueError``/``RuntimeError``) on bytes
    that are not a valid ciphertext for the context; callers translate it.
    """
    path = _path()
    path.write_bytes(data)
    ct = sealapi.Ciphertext()
    ct.load(seal_context, str(path))
    return ct
