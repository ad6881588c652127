"""Keep a hospital's ``flower-supernode`` running: restart with capped backoff.

A SuperNode exits on its own in ordinary situations: its key is not (yet)
registered at the SuperLink (``[code: 2004]``), the SuperLink lost its state
(401), or the operator unregistered the node. The hospital daemon's job is to
start it again without hammering the coordinator, to say clearly in its log
why it stopped, and never to leave a SuperNode (or the ``flower-superexec`` and
ClientApp processes it starts) running after the daemon is gone.

The connection is outbound only: the SuperNode dials the coordinator's public
Fleet gateway over TLS (verified with the consortium CA) and signs every request
with the node key enrolled at provisioning. Its own Runtime API (``--port``,
used by the ClientApp processes it spawns) binds to 127.0.0.1; several nodes on
one machine need distinct ports.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from fedvault.client.supernode_entry import CONNECTION_ENDED_TEXT
from fedvault.errors import InvalidConfigError
from fedvault.flower_env import (
    ConfigValue,
    FlowerProcessError,
    flower_env,
    reap_group,
    spawn,
    terminate_tree,
    toml_table,
)

__all__ = ["SuperNodeConfig", "SuperNodeSupervisor"]

_log = logging.getLogger(__name__)
_FLOWER_CODE = re.compile(r"\[code: (\d+)\][^\n]*")
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels
_NOT_ENROLLED = "2004"  # Flower's FLEET_NODE_ACTIVATION_FAILED: unknown key, or still online
# ActivateNode's wording when the key is enrolled but its previous session has not expired.
_STILL_ONLINE = "could not be activated"


@dataclass(frozen=True)
class SuperNodeConfig:
    """How to run one hospital's SuperNode.

    Parameters
    ----------
    superlink
        ``host:port`` of the coordinator's public Fleet gateway.
    root_certificates
        Consortium CA certificate (PEM) that verifies the coordinator.
    private_key
        The node's ECDSA private key, OpenSSH format, enrolled at the SuperLink.
    state_dir
        Holds the SuperNode log, its node-config file and its ``FLWR_HOME``.
    runtime_port
        Loopback port of the SuperNode's Runtime API; distinct per node per host.
    node_config
        Values the ClientApp reads from ``context.node_config``.
    backoff_initial, backoff_max
        First restart delay and its cap, seconds; the delay doubles on each
        exit that comes less than ``stable_after`` seconds after a start.
    stop_grace
        Seconds between SIGTERM and SIGKILL on stop.
    session_retry_s
        Restart delay cap while the SuperLink still counts this node's previous
        session as online: after a crash (kill -9, power loss) the session ends
        only when its heartbeats are missed, about 60 s later, and the hospital
        should rejoin within seconds of that, not after a long backoff.
    """

    superlink: str
    root_certificates: Path
    private_key: Path
    state_dir: Path
    runtime_port: int = 9094
    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0
    stop_grace: float = 10.0
    session_retry_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.runtime_port <= 65535:
            raise InvalidConfigError(
                f"runtime_port={self.runtime_port} is not a TCP port; use 1..65535."
            )
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise InvalidConfigError(
                f"backoff_initial={self.backoff_initial}, backoff_max={self.backoff_max}: "
                "need 0 < backoff_initial <= backoff_max (seconds)."
            )
        for name in ("stable_after", "stop_grace", "session_retry_s"):
            if not getattr(self, name) > 0:
                raise InvalidConfigError(f"{name}={getattr(self, name)} must be > 0 seconds.")
        object.__setattr__(self, "node_config", MappingProxyType(dict(self.node_config)))

    @property
    def log_path(self) -> Path:
        """The SuperNode's log (its output plus one marker line per (re)start)."""
        return self.state_dir / "supernode.log"

    @property
    def node_config_path(self) -> Path:
        """TOML file passed as ``--node-config``."""
        return self.state_dir / "node-config.toml"


def supernode_command() -> list[str]:
    """``flower-supernode``, through a wrapper that exits when its Fleet connection ends.

    Flower's would idle forever; see :mod:`fedvault.client.supernode_entry`.
    """
    return [sys.executable, "-m", "fedvault.client.supernode_entry"]


class SuperNodeSupervisor:
    """Run ``flower-supernode`` in a monitor thread, restarting it when it exits.

    The delay before restart ``n`` of a run of quick failures is
    ``min(backoff_initial * 2**(n-1), backoff_max)``; a SuperNode that stayed up
    ``stable_after`` seconds starts the sequence again. Each exit is logged (logger
    ``fedvault.client.supernode`` and a marker in the SuperNode log) with its exit
    code and the Flower error code it printed, e.g. 2004: key not enrolled.
    """

    def __init__(self, config: SuperNodeConfig) -> None:
        self.config = config
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.last_exit_reason: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def argv(self) -> list[str]:
        """Command line of ``flower-supernode``."""
        c = self.config
        argv = [
            *supernode_command(),
            "--superlink", c.superlink,
            "--root-certificates", str(c.root_certificates),
            "--auth-supernode-private-key", str(c.private_key),
            "--port", str(c.runtime_port),
        ]  # fmt: skip
        if c.node_config:
            argv += ["--node-config", str(c.node_config_path)]
        return argv

    @property
    def pid(self) -> int | None:
        """PID of the current SuperNode process, if one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def supervising(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start supervising (returns at once; the first launch is immediate)."""
        if self.supervising:
            raise FlowerProcessError("SuperNode supervisor already running; stop() it first.")
        c = self.config
        for path in (c.root_certificates, c.private_key):
            if not path.is_file():
                raise InvalidConfigError(
                    f"{path} does not exist; copy it from this hospital's provisioning kit."
                )
        c.state_dir.mkdir(parents=True, exist_ok=True)
        if c.node_config:
            c.node_config_path.write_text(toml_table(c.node_config), encoding="utf-8")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._supervise, name="supernode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the SuperNode (SIGTERM, SIGKILL after the grace) and stop restarting it."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None:
            terminate_tree(proc, grace=self.config.stop_grace)
        if self._thread is not None:
            self._thread.join(timeout=self.config.stop_grace + 5)
            self._thread = None

    def __enter__(self) -> SuperNodeSupervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _supervise(self) -> None:
        c = self.config
        env = flower_env(flwr_home=c.state_dir / "flwr-home")
        failures = 0
        while not self._stopping.is_set():
            self._mark(f"starting flower-supernode (start #{self.restarts + 1})")
            offset = c.log_path.stat().st_size
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                # Spawned from this thread: the SuperNode gets SIGTERM if it ends.
                self._proc = spawn(self.argv(), env=env, log_path=c.log_path)
            code = self._proc.wait()
            # A SuperNode that exits by itself leaves its SuperExec running until
            # that notices; stop it so crashes do not pile up orphans.
            reap_group(self._proc.pid, grace=c.stop_grace)
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            failures = 1 if ran >= c.stable_after else failures + 1
            delay = min(c.backoff_initial * 2 ** (failures - 1), c.backoff_max)
            self.last_exit_code = code
            self.last_exit_reason = _exit_reason(c.log_path, offset)
            if _STILL_ONLINE in self.last_exit_reason:
                delay = min(delay, c.session_retry_s)
            self.restarts += 1
            message = (
                f"flower-supernode exited with code {code} after {ran:.1f} s "
                f"({self.last_exit_reason}); restart #{self.restarts} in {delay:.2f} s"
            )
            _log.warning(message)
            self._mark(message)
            self._stopping.wait(delay)

    def _mark(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.config.log_path.open("a", encoding="utf-8") as log:
            log.write(f"--- fedvault {stamp} {text} ---\n")


def _exit_reason(log_path: Path, offset: int) -> str:
    """Summarise why the SuperNode exited, from what it logged since ``offset``."""
    with log_path.open("rb") as log:
        log.seek(max(offset, log.seek(0, 2) - 16_384))
        text = _ANSI.sub("", log.read().decode("utf-8", errors="replace"))
    if _NOT_ENROLLED in _FLOWER_CODE.findall(text) and _STILL_ONLINE in text:
        return (
            f"[code: 2004] the SuperLink says this node {_STILL_ONLINE}: its previous "
            "session (e.g. before a crash) still counts as online until its heartbeats "
            "are missed, about 60 s; retrying"
        )
    if _NOT_ENROLLED in _FLOWER_CODE.findall(text):
        # Flower 1.41 logs the same words for both causes at the SuperNode; only the
        # SuperLink's log has the detail. The second one is real under load: an
        # activation that timed out at the SuperNode but succeeded at the SuperLink
        # makes the retry find the node "still online" (seen in the soak).
        return (
            "[code: 2004] the SuperLink did not activate this node: its key is not "
            "registered (ask the consortium operator to register this node's public "
            "key), or its previous session still counts as online for up to ~60 s "
            "(after a crash or a timed-out activation); retrying"
        )
    if "address already in use" in text:
        port = re.search(r"address \('[^']*', (\d+)\)", text)
        which = f"port {port.group(1)}" if port else "its port"
        return (
            f"the SuperNode's Runtime API could not bind {which}: another process holds "
            "it; stop that process, or restart the hospital daemon (it picks a free "
            "port when it starts)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "the coordinator's TLS certificate does not verify against this kit's CA: "
            "this is another consortium's kit, or the wrong coordinator address"
        )
    if CONNECTION_ENDED_TEXT in text:
        errors = [line for line in text.splitlines() if "ERROR" in line]
        cause = f": {errors[-1].strip()}" if errors else ""
        return f"{CONNECTION_ENDED_TEXT}{cause}; reconnecting"
    found = list(_FLOWER_CODE.finditer(text)) or list(_EXIT_CODE.finditer(text))
    if found:
        return found[-1].group(0).strip()
    return "no error reported; see " + str(log_path)
