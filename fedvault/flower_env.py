"""Environment and process plumbing for Flower's daemons and CLI.

Both the coordinator (``flower-superlink``, ``flwr``) and the hospitals
(``flower-supernode``) start Flower as subprocesses. This leaf module holds what
both sides need, so neither imports the other:

* :func:`flower_env` — the environment every Flower subprocess gets: telemetry
  and update checks off (hospital machines must not phone home), a short
  SuperExec task poll (:data:`SUPEREXEC_TASK_POLL_S`), a private
  ``FLWR_HOME`` (Flower writes app caches and CLI config there; the default
  ``~/.flwr`` would mix state between daemons and users), and the interpreter's
  ``bin`` directory first on ``PATH`` (Flower launches ``flower-superexec``,
  ``flwr-serverapp`` and ``flwr-clientapp`` by bare name).
* :func:`write_cli_config` — the ``$FLWR_HOME/config.toml`` that names the
  SuperLink connection ``flwr`` commands use (schema of ``flwr/cli/flower_config.py``).
* :func:`spawn` / :func:`terminate_tree` — start a daemon in its own session and
  stop it with SIGTERM, then SIGKILL after a grace period, including the
  helpers Flower detaches into their own sessions (``flower-superexec`` uses
  ``start_new_session=True``, so a process-group kill alone would orphan it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from fedvault.errors import FedvaultError, InvalidConfigError

__all__ = [
    "SUPEREXEC_POLL_ENV",
    "SUPEREXEC_TASK_POLL_S",
    "ConfigValue",
    "FlowerProcessError",
    "app_pyproject",
    "descendants",
    "flower_env",
    "flower_executable",
    "free_port",
    "group_members",
    "log_tail",
    "process_children",
    "reap_group",
    "spawn",
    "terminate_tree",
    "toml_table",
    "write_cli_config",
]

#: A value of a Flower run config or node config (what TOML and Flower accept).
ConfigValue = bool | int | float | str

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DOTTED_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
#: Seconds between a SuperExec's polls for a task (a message for a ClientApp, a
#: run for a ServerApp) at its SuperNode or SuperLink: loopback HTTP calls, a few
#: milliseconds of CPU each (Flower's default is 1.0, its minimum 0.01).
SUPEREXEC_TASK_POLL_S = 0.2
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# These make flower-superlink open legacy gRPC Fleet/Control servers on
# 0.0.0.0:9092/9093 next to its HTTPS port: a second, unguarded door.
_FORBIDDEN_VARS = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


class FlowerProcessError(FedvaultError, RuntimeError):
    """A Flower daemon or CLI call failed to start, stay up, or succeed.

    The message carries the tail of the process log and the action to take.
    """


def flower_executable(name: str) -> str:
    """Return the path of a Flower console script (``flwr``, ``flower-superlink``...).

    The script next to the running interpreter wins, so a daemon started from a
    virtual environment runs that environment's Flower even when ``PATH`` does not
    include it.
    """
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(
            f"Flower command {name!r} not found next to {sys.executable} nor on PATH; "
            "install fedvault (which installs flwr) into this environment."
        )
    return found


def flower_env(*, flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a Flower subprocess.

    Parameters
    ----------
    flwr_home
        Directory Flower uses as ``FLWR_HOME``; created if missing. Give each daemon
        its own, inside its state directory.
    base
        Environment to start from; defaults to ``os.environ``.
    """
    env = dict(os.environ if base is None else base)
    for name in _FORBIDDEN_VARS:
        env.pop(name, None)
    flwr_home.mkdir(parents=True, exist_ok=True)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Apps run in the daemon's own interpreter (no runtime dependency install).
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # Every message waits for the SuperExec's next task poll before its ClientApp
    # (or the run's ServerApp) process starts; Flower's 1 s default cost a 3-node
    # round ~0.75 s per message round trip. An operator's own setting wins.
    env.setdefault(SUPEREXEC_POLL_ENV, repr(SUPEREXEC_TASK_POLL_S))
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
    return env


def write_cli_config(
    flwr_home: Path,
    *,
    name: str,
    address: str,
    root_certificates: Path | None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, the default.

    Without this file ``flwr`` writes its own whose default is a local simulation,
    so a run would silently go nowhere near the real SuperLink.

    Parameters
    ----------
    flwr_home
        The ``FLWR_HOME`` the ``flwr`` commands will run with.
    name
        Connection name (a TOML bare key), passed as the ``SUPERLINK`` argument.
    address
        ``host:port`` of the SuperLink's Control API.
    root_certificates
        CA certificate that verifies the SuperLink; ``None`` means plain HTTP
        (``insecure = true``), for tests only.
    """
    if not _BARE_KEY.match(name):
        raise InvalidConfigError(
            f"connection name {name!r} must match [A-Za-z0-9_-]+; choose a simpler name."
        )
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {json.dumps(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "{description}"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedvault"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
{config}
"""


def app_pyproject(
    *, name: str, description: str, serverapp: str, clientapp: str, config: str
) -> str:
    """The ``pyproject.toml`` of a Flower app directory that ``flwr run`` submits.

    ``serverapp``/``clientapp`` are ``module:attribute`` references; ``config`` is
    the body of ``[tool.flwr.app.config]`` (TOML lines).
    """
    return _APP_PYPROJECT.format(
        name=name,
        description=description,
        serverapp=serverapp,
        clientapp=clientapp,
        config=config,
    )


def toml_table(values: Mapping[str, ConfigValue]) -> str:
    """Render flat ``key = value`` TOML for ``--run-config FILE`` / ``--node-config FILE``.

    Passing a file rather than ``'k=v k2="s"'`` strings avoids Flower's
    space-splitting parser and all shell quoting. Dotted keys become nested tables,
    which Flower flattens back to the dotted name.
    """
    lines = []
    for key, value in values.items():
        if not _DOTTED_KEY.match(key):
            raise InvalidConfigError(
                f"config key {key!r} must be [A-Za-z0-9_-] parts joined by dots; rename it."
            )
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int):
            rendered = str(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidConfigError(f"config {key}={value} must be a finite number.")
            rendered = repr(value)
        elif isinstance(value, str):
            rendered = json.dumps(value)  # JSON string escapes are valid TOML escapes.
        else:
            raise InvalidConfigError(
                f"config {key} has type {type(value).__name__}; use bool, int, float or str."
            )
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_path``.

    A new session makes the child a process-group leader, so :func:`terminate_tree`
    can signal it and everything it forks that stays in its group. On Linux the
    child also gets SIGTERM when the *thread* that spawned it ends (``prctl``
    PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL leaves no daemon behind;
    spawn from a thread that lives as long as the child should (Flower's own
    helpers then follow through their parent-pid monitors).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != parent:  # parent died before the signal was armed
            os._exit(1)

    return arm


def terminate_tree(proc: subprocess.Popen[bytes], *, grace: float) -> int:
    """Stop ``proc`` and all its descendants: SIGTERM, then SIGKILL after ``grace``.

    Descendants are collected *before* signalling: once the parent dies they are
    re-parented and can no longer be found. Returns the process's exit code.
    """
    if proc.poll() is not None:
        return int(proc.returncode)
    deadline = time.monotonic() + grace
    tree = descendants(proc.pid)
    _kill_group(proc.pid, signal.SIGTERM)
    for pid in tree:
        _kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        tree |= descendants(proc.pid)
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
    tree = _wait_gone(tree, timeout=max(0.0, deadline - time.monotonic()))
    for pid in tree:
        _kill(pid, signal.SIGKILL)
    _wait_gone(tree, timeout=1.0)  # SIGKILL is asynchronous: return once they are gone
    return int(proc.returncode)


def _wait_gone(pids: set[int], *, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while pids := {pid for pid in pids if _alive(pid)}:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return pids


def log_tail(path: Path, *, max_bytes: int = 4000) -> str:
    """Return the last ``max_bytes`` of a log file (for error messages)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _process_stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields after the command name)`` of every process (Linux ``/proc``)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The fields after the ")" that closes the command name: state, ppid, pgrp, ...
        yield int(entry), stat.rsplit(")", 1)[1].split()


def process_children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for pid, fields in _process_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    return children


def group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    return {pid for pid, f in _process_stats() if int(f[2]) == pgid and f[0] != "Z"}


def reap_group(pgid: int, *, grace: float) -> set[int]:
    """Stop what a process that exited on its own left in its group.

    Flower's SuperNode forks a SuperExec that only notices its parent died at
    its next parent-pid check; a restart loop must not leave one behind per
    crash. SIGTERM, SIGKILL after ``grace``; returns the pids that were found.
    """
    found = group_members(pgid)
    if found:
        _kill_group(pgid, signal.SIGTERM)
        left = _wait_gone(found, timeout=grace)
        for pid in left:
            _kill(pid, signal.SIGKILL)
        _wait_gone(left, timeout=1.0)
    return found


def descendants(root: int, children: Mapping[int, list[int]] | None = None) -> set[int]:
    """All descendants of ``root``.

    From ``children`` (one :func:`process_children` read can serve many roots) or
    a fresh read of ``/proc``.
    """
    children = process_children() if children is None else children
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
