"""Task fingerprints: proof that every party runs the same task code and model.

The coordinator never ships code: every party runs the task installed
locally, and copies that disagree (another version, a local patch) average
silently into a wrong model. So before round 1 every party computes a
:class:`TaskFingerprint`; :meth:`~TaskFingerprint.check_matches` refuses any
difference, naming both sides' values, and a site policy can pin
:attr:`~TaskFingerprint.digest`. Only :func:`fingerprint_task` loads torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import math
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedvault.errors import InvalidConfigError, MalformedUpdateError, TaskMismatchError

if TYPE_CHECKING:
    from fedvault.task import Task

__all__ = ["ArchitectureEntry", "TaskFingerprint", "code_identity", "fingerprint_task"]

#: One tensor of a model's ``state_dict``: ``(name, shape, dtype)``, dtype like ``"float32"``.
ArchitectureEntry = tuple[str, tuple[int, ...], str]
_Arch = tuple[ArchitectureEntry, ...]

_FIELDS = ("task", "distribution", "version", "code_sha256", "architecture", "frozen_sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEED = 0  # models are built under a fixed seed, so the architecture never depends on RNG state


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _fail(message: str) -> MalformedUpdateError:
    return MalformedUpdateError(f"malformed task fingerprint: {message}")


@dataclass(frozen=True)
class TaskFingerprint:
    """What a party's installed task is: its code, where it came from, its model.

    Parameters
    ----------
    task
        ``Task.name``.
    distribution, version
        The installed distribution providing the task's module, and its
        version; ``""`` for a plain module on ``PYTHONPATH``.
    code_sha256
        Hex SHA-256 of the task's files (:func:`code_identity`): catches local patches.
    architecture
        ``(name, shape, dtype)`` per ``state_dict`` entry: identical code on
        another torch may still build another model, and weights must align.
    frozen_sha256
        For a task whose trainable parameters alone travel (``Task.shared ==
        "trainable"``: adapters on a pretrained model), hex SHA-256 of the
        frozen tensors' values, which every party loads itself (the base
        model's weights may come from another package); ``""`` otherwise.
    """

    task: str
    distribution: str
    version: str
    code_sha256: str
    architecture: tuple[ArchitectureEntry, ...]
    frozen_sha256: str = ""

    @property
    def architecture_sha256(self) -> str:
        """Hex SHA-256 of the architecture alone (canonical JSON), for short listings."""
        return hashlib.sha256(_canonical(self.architecture).encode()).hexdigest()

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` over :meth:`to_json`: one value a site policy can pin."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        """Canonical JSON (compact, sorted keys): equal fingerprints give equal bytes."""
        return _canonical(asdict(self))  # tuples become JSON lists

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskFingerprint:
        """Parse a peer's fingerprint, refusing anything :meth:`to_json` would not write.

        Unknown keys too: dropped here, they would change the :attr:`digest`.

        Raises
        ------
        MalformedUpdateError
            Not JSON, or a field is missing, unknown or ill-typed (named in the message).
        """
        try:
            obj = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _fail(f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise _fail(f"expected a JSON object, got {type(obj).__name__}")
        for key in (*_FIELDS, *sorted(set(obj) - set(_FIELDS))):
            if key not in _FIELDS or key not in obj:
                raise _fail(f"field {key!r} is {'unknown' if key in obj else 'missing'}")
            if key != "architecture" and not isinstance(obj[key], str):
                raise _fail(f"field {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj["task"].strip():
            raise _fail("field 'task' is empty")
        if not _HEX64.fullmatch(obj["code_sha256"]):
            raise _fail("field 'code_sha256' is not 64 lowercase hex digits")
        if obj["frozen_sha256"] and not _HEX64.fullmatch(obj["frozen_sha256"]):
            raise _fail("field 'frozen_sha256' is neither empty nor 64 lowercase hex digits")
        arch = _parse_architecture(obj.pop("architecture"))
        return cls(**obj, architecture=arch)

    def describe(self) -> str:
        """One line for logs and listings: name, version, origin, short hashes, size."""
        n, count = len(self.architecture), sum(math.prod(s) for _, s, _ in self.architecture)
        head = f"{self.task} {self.version}" if self.version else self.task
        dist = f"dist {self.distribution}" if self.distribution else "no distribution"
        arch = f"arch {self.architecture_sha256[:12]}: {n} tensor{'s' * (n != 1)}"
        return f"{head} ({dist}, code {self.code_sha256[:12]}, {arch}, {count} parameters)"

    def check_matches(
        self,
        ours: TaskFingerprint,
        *,
        theirs_label: str = "the coordinator",
        ours_label: str = "this hospital",
    ) -> None:
        """Refuse to train unless ``ours`` equals this (the peer's) fingerprint.

        It lists every differing part with both values: who must upgrade, what to undo.

        Raises
        ------
        TaskMismatchError
            Any field differs.
        """
        tl, ol, diffs = theirs_label, ours_label, []
        for key in _FIELDS[:3]:
            a, b = getattr(self, key), getattr(ours, key)
            if a != b:
                diffs.append(f"{key}: {tl} runs {a or '(none)'}, {ol} {b or '(none)'}")
        if self.code_sha256 != ours.code_sha256:
            diffs.append(f"code sha256: {tl} {self.code_sha256} vs {ol} {ours.code_sha256}")
        if self.architecture != ours.architecture:
            first = _first_difference(self.architecture, ours.architecture)
            diffs.append(f"architecture: {first} ({tl} vs {ol})")
        if self.frozen_sha256 != ours.frozen_sha256:
            diffs.append(
                f"frozen (pretrained) weights sha256: {tl} {self.frozen_sha256 or '(none)'} vs "
                f"{ol} {ours.frozen_sha256 or '(none)'}"
            )
        if not diffs:
            return
        same = self.distribution if self.distribution == ours.distribution else ""
        target = same or "the task's distribution"
        raise TaskMismatchError(
            f"task fingerprint differs from {tl}'s: {'; '.join(diffs)}. "
            f"Install the same version of {target} at every party."
        )


def _parse_architecture(value: object) -> _Arch:
    if not isinstance(value, list):
        raise _fail(f"field 'architecture' must be a list, got {type(value).__name__}")
    entries: list[ArchitectureEntry] = []
    for i, entry in enumerate(value):
        where = f"field 'architecture'[{i}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise _fail(f"{where} must be a [name, shape, dtype] list")
        name, shape, dtype = entry
        if not isinstance(name, str) or not name:
            raise _fail(f"{where} name must be a non-empty string")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(f"{where} ({name!r}) shape must be a list of non-negative integers")
        if not isinstance(dtype, str) or not dtype:
            raise _fail(f"{where} ({name!r}) dtype must be a non-empty string")
        entries.append((name, tuple(shape), dtype))
    if len({name for name, _, _ in entries}) != len(entries):
        raise _fail("field 'architecture' names a tensor twice")
    return tuple(entries)


def _first_difference(theirs: _Arch, ours: _Arch) -> str:
    """The first differing tensor, both sides: the layer to look at."""
    pairs = zip(theirs, ours, strict=False)
    i = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(theirs), len(ours)))
    a, b = (arch[i] if i < len(arch) else None for arch in (theirs, ours))
    counts = f" ({len(theirs)} vs {len(ours)} tensors)" if len(theirs) != len(ours) else ""
    if a and b and a[0] == b[0]:
        return f"first difference {a[0]!r} {a[1]} {a[2]} vs {b[1]} {b[2]}{counts}"
    a_s, b_s = (f"{e[0]!r} {e[1]} {e[2]}" if e else "(none)" for e in (a, b))
    return f"first difference at tensor {i}: {a_s} vs {b_s}{counts}"


def code_identity(module: str) -> tuple[str, str, str]:
    """``(distribution, version, code_sha256)`` of the installed code behind ``module``.

    The distribution is the first (sorted) that ``importlib.metadata`` says
    provides the top-level package, else a ``*.dist-info`` whose
    ``top_level.txt`` or ``RECORD`` lists it, else ``""`` with the module's
    ``__version__``. The hash covers the files the import system loads: the
    directories of each package on the way to ``module`` (``a``, ``a.b``,
    ``a.b.c``), or the file of a plain top-level module. Editable installs with
    ``package-dir`` mappings spread one package over several directories, so
    one directory would miss code; asking the import system covers wheels,
    editable installs and ``PYTHONPATH`` modules alike. Every file counts (data
    shapes a model as much as code) but bytecode, which varies by interpreter.
    Files are keyed by import path (``a/b/model.py``), not install location:
    byte-identical task files give the same hash however they were installed.
    fedvault's built-in tasks hash only their own module: fedvault's version
    (the distribution part) pins the rest.

    Raises
    ------
    InvalidConfigError
        ``module`` cannot be found, or no file backs it (zipped or built in).
    """
    if not isinstance(module, str) or not all(p.isidentifier() for p in module.split(".")):
        raise InvalidConfigError(f"{module!r} is not a module name (like 'pkg.task')")
    code = _code_sha256(module)  # first: it explains a missing module best
    return (*_distribution(module), code)


def _distribution(module: str) -> tuple[str, str]:
    top = module.partition(".")[0]
    names = sorted(set(metadata.packages_distributions().get(top, ())))
    if names:
        try:
            return names[0], metadata.version(names[0])
        except metadata.PackageNotFoundError:
            return names[0], ""
    claims = sorted(
        (dist.metadata["Name"], dist.version or "")
        for dist in metadata.distributions()
        if dist.metadata["Name"] and _claims(dist, top)
    )
    if claims:
        return claims[0]
    for name in dict.fromkeys((module, top)):
        try:
            version = getattr(importlib.import_module(name), "__version__", None)
        except ImportError as exc:
            raise InvalidConfigError(f"cannot import task module {name!r}: {exc}") from exc
        if isinstance(version, str) and version:
            return "", version
    return "", ""


def _claims(dist: metadata.Distribution, top: str) -> bool:
    """Whether ``top_level.txt`` or ``RECORD`` names ``top`` (packages_distributions reads one)."""
    listed = (dist.read_text("top_level.txt") or "").split()
    firsts = {file.parts[0] for file in dist.files or () if file.parts}
    module_file = re.compile(rf"{top}(\.[\w-]+)*\.(py|so|pyd)")
    return top in listed or any(f == top or module_file.fullmatch(f) for f in firsts)


def _builtin_sha256(module: str) -> str:
    """SHA-256 of a built-in task's own module file (see :func:`_code_sha256`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise InvalidConfigError(f"cannot find task module {module!r}; is fedvault installed?")
    with open(spec.origin, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    rel = "/".join(module.split(".")) + ".py"
    return hashlib.sha256(f"{rel}\0{digest}\n".encode()).hexdigest()


def _code_sha256(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "fedvault" and len(parts) > 1:
        # A built-in task: fedvault itself is pinned by its version (the
        # distribution part); hashing all of it would make every checkout,
        # build directory or stray file a "different task". The task's own
        # module is what defines its model, data and defaults.
        return _builtin_sha256(module)
    roots: list[tuple[str, int, Path]] = []  # (import name, search order, directory)
    files: list[tuple[str, Path]] = []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(prefix)
        except (ImportError, ValueError):
            spec = None  # a parent is not a package
        if spec is None:
            raise InvalidConfigError(f"cannot find task module {prefix!r}; is the task installed?")
        # An imported package's __path__ is what loads its submodules (it may have grown).
        locations = getattr(sys.modules.get(prefix), "__path__", spec.submodule_search_locations)
        if locations is not None:
            roots += [(prefix, k, Path(os.path.realpath(loc))) for k, loc in enumerate(locations)]
        elif i == 1 and spec.origin and os.path.isfile(spec.origin):
            files.append((Path(spec.origin).name, Path(spec.origin)))
    chosen: list[tuple[str, Path]] = []
    # Shallowest first, so a subpackage inside its parent's directory is skipped, not hashed twice.
    for prefix, _, root in sorted(roots, key=lambda r: (len(r[2].parts), r[0], r[1])):
        if not any(root.is_relative_to(c) for _, c in chosen):
            chosen.append((prefix, root))
    for prefix, root in chosen:
        files += [(f"{prefix.replace('.', '/')}/{rel}", path) for rel, path in _walk(root)]
    if not files:
        raise InvalidConfigError(f"no files back task module {module!r}; install it unzipped")
    lines = []
    for rel, path in files:
        with path.open("rb") as f:
            lines.append(f"{rel}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8", "surrogateescape")).hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """``(posix path below root, path)`` of every regular file, following links once."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: walk each directory once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.endswith((".pyc", ".pyo")) and path.is_file():
                yield path.relative_to(root).as_posix(), path


def fingerprint_task(task: Task, module: str) -> TaskFingerprint:
    """The fingerprint of ``task``, loaded from module ``module`` (``"oncology_task"``).

    The model is built under a fixed seed in forked RNG state: the architecture is
    deterministic, and the caller's torch, numpy and ``random`` streams are untouched.

    Raises
    ------
    InvalidConfigError
        The module cannot be found, or ``build_model`` returns no ``nn.Module``.
    """
    distribution, version, code = code_identity(module)
    architecture, frozen = _architecture(task)
    return TaskFingerprint(task.name, distribution, version, code, architecture, frozen)


def _frozen_sha256(task: Task, model: Any) -> str:
    """SHA-256 over the names and bytes of the tensors that do not travel ("" if all do)."""
    import numpy as np

    if task.shared != "trainable":
        return ""
    shared = set(task.shared_names(model))
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        if name in shared:
            continue
        array = np.ascontiguousarray(value.detach().cpu().numpy())
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _architecture(task: Task) -> tuple[_Arch, str]:
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    # Fork CUDA only if it is up: a coordinator that never trains needs no GPU context.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(_SEED)  # not torch.manual_seed: it seeds CUDA too
            if devices:
                torch.cuda.manual_seed_all(_SEED)
            random.seed(_SEED)
            np.random.seed(_SEED)
            model = task.build_model()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if not isinstance(model, torch.nn.Module):
        got = type(model).__name__
        raise InvalidConfigError(f"task {task.name!r}: build_model returned a {got}, no nn.Module")
    entries: list[ArchitectureEntry] = []
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            shape, dtype = tuple(map(int, value.shape)), str(value.dtype).removeprefix("torch.")
            entries.append((name, shape, dtype))
        else:  # a module's extra state: no shape, but its type must still agree
            entries.append((name, (), type(value).__name__))
    return tuple(entries), _frozen_sha256(task, model)
