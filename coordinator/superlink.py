"""Supervise the coordinator's ``flower-superlink`` and drive it with the ``flwr`` CLI.

Deployment (facts verified with flwr 1.41, see ``docs/flower-deployment.md``):

* ``flower-superlink`` listens on **127.0.0.1:control_port** only, with TLS,
  ``--enable-supernode-auth``, a persistent ``--database`` (node registrations and
  runs survive a restart; SuperNodes reconnect) and no runtime dependency
  installation (offline). That one port serves Fleet, Control and Runtime APIs,
  and Flower has no login on the Control API, hence loopback only.
* :mod:`fedvault.coordinator.fleet_gateway` listens on **fleet_host:fleet_port**
  (the address hospitals dial) and forwards the Fleet API only.
* The operator's ``flwr`` commands (:class:`ControlClient`) talk to the loopback
  port, with an isolated ``FLWR_HOME`` holding a ``config.toml`` we write.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.errors import FedvaultError, InvalidConfigError
from fedvault.flower_env import (
    ConfigValue,
    FlowerProcessError,
    flower_env,
    flower_executable,
    free_port,
    log_tail,
    spawn,
    terminate_tree,
    toml_table,
    write_cli_config,
)
from fedvault.kit import Kit

__all__ = [
    "ControlApiError",
    "ControlClient",
    "RunStatus",
    "SuperLinkConfig",
    "SuperLinkProcess",
]

_LOOPBACK = "127.0.0.1"


class ControlApiError(FedvaultError):
    """A ``flwr`` Control API command was refused or failed."""


@dataclass(frozen=True)
class SuperLinkConfig:
    """Where and how the coordinator's SuperLink runs.

    Parameters
    ----------
    state_dir
        Holds the SuperLink database, logs and the ``FLWR_HOME`` directories.
    ca_certfile, certfile, keyfile
        PEM files. The server certificate must name the public address hospitals
        dial *and* ``IP:127.0.0.1`` (Flower's ServerApp runtime and the gateway
        reach the SuperLink over loopback and verify it).
    fleet_host, fleet_port
        Public bind address of the Fleet gateway (what SuperNodes dial).
    control_port
        Loopback port of the SuperLink itself (Control + Runtime + Fleet).
    stop_grace
        Seconds between SIGTERM and SIGKILL on stop.
    """

    state_dir: Path
    ca_certfile: Path
    certfile: Path
    keyfile: Path
    fleet_host: str = "0.0.0.0"
    fleet_port: int = 9092
    control_port: int = 9093
    stop_grace: float = 10.0

    def __post_init__(self) -> None:
        for name in ("fleet_port", "control_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise InvalidConfigError(f"{name}={port} is not a TCP port; use 1..65535.")
        if self.fleet_port == self.control_port:
            raise InvalidConfigError(
                f"fleet_port and control_port are both {self.fleet_port}; "
                "the public gateway and the loopback SuperLink need different ports."
            )
        if not self.stop_grace > 0:
            raise InvalidConfigError(f"stop_grace={self.stop_grace} must be > 0 seconds.")

    @classmethod
    def for_kit(cls, kit: Kit, state_dir: Path, **overrides: Any) -> SuperLinkConfig:
        """The SuperLink a coordinator kit describes: its certificates, its public address.

        The loopback control port is a free one; ``overrides`` (say ``stop_grace``)
        set the rest.
        """
        host, _, port = kit.coordinator_address.rpartition(":")
        settings: dict[str, Any] = {
            "ca_certfile": kit.ca_path,
            "certfile": kit.cert_path,
            "keyfile": kit.key_path,
            "fleet_host": host,
            "fleet_port": int(port),
            "control_port": free_port(),
            **overrides,
        }
        return cls(state_dir=state_dir, **settings)

    @property
    def database(self) -> Path:
        """SQLite file of the SuperLink's LinkState (nodes, runs, messages)."""
        return self.state_dir / "superlink.db"

    @property
    def control_address(self) -> str:
        """``host:port`` of the Control API (loopback only)."""
        return f"{_LOOPBACK}:{self.control_port}"


@dataclass(frozen=True)
class RunStatus:
    """A run's status as the SuperLink reports it (``flwr ls --run-id``)."""

    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        """True once the run can no longer change."""
        return self.status == "finished"

    @property
    def succeeded(self) -> bool:
        """True when the ServerApp returned normally."""
        return self.finished and self.sub_status == "completed"


class ControlClient:
    """Run ``flwr`` Control API commands against one SuperLink address.

    Each instance owns an ``FLWR_HOME`` with a single connection named ``name``,
    so nothing depends on (or touches) the user's ``~/.flwr``. Output is requested
    as JSON: with ``--format json`` ``flwr`` exits 0 even when the call failed, so
    success is read from the ``"success"`` field.
    """

    def __init__(
        self,
        *,
        address: str,
        root_certificates: Path | None,
        flwr_home: Path,
        name: str = "fedvault",
        timeout: float = 60.0,
    ) -> None:
        self.address = address
        self._root = root_certificates
        self._home = flwr_home
        self._name = name
        self._timeout = timeout
        write_cli_config(flwr_home, name=name, address=address, root_certificates=root_certificates)

    def register_node(self, pubkey_path: Path) -> int:
        """Enrol a SuperNode's OpenSSH public key; return its node id.

        A key can be registered once only, ever (even after unregistering).
        """
        out = self._call("supernode", "register", str(pubkey_path))
        return int(out["node-id"])

    def register_nodes(self, pubkey_paths: Sequence[Path]) -> dict[Path, int]:
        """Enrol many OpenSSH public keys over one connection; map each to its node id.

        A key can be registered only once, ever; one registered before (on a
        coordinator restart every key is) maps to the node id the SuperLink already
        holds for it, looked up by public key. So a caller can record enrolments
        idempotently, even if it was killed between registering a key and
        recording it. The request is the one ``flwr supernode register`` sends,
        through Flower's own client, in this process: one ``flwr`` run per key cost
        3-20 s of CLI start-up, 25 minutes for a 100-hospital consortium on a
        loaded 2-core host.
        """
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
        from flwr.supercore.constant import NodeStatus
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        out: dict[Path, int] = {}
        known: dict[Path, bytes] = {}
        with self._http() as client:
            for path in pubkey_paths:
                try:
                    key = serialization.load_ssh_public_key(Path(path).read_bytes())
                    raw = public_key_to_bytes(key)  # type: ignore[arg-type]
                except (OSError, ValueError, TypeError) as exc:
                    raise ControlApiError(
                        f"node key {path} is not a readable OpenSSH public key ({exc}); "
                        "re-provision the consortium's kits"
                    ) from None
                request = RegisterNodeRequest(public_key=raw)
                try:
                    out[path] = int(
                        self._rpc("supernode register", client.RegisterNode, request).node_id
                    )
                except ControlApiError as exc:
                    if "already in use" not in str(exc):
                        raise
                    known[path] = raw
            if known:
                listed = self._rpc("supernode ls", client.ListNodes, ListNodesRequest())
                by_key = {bytes(n.public_key): n for n in listed.nodes_info}
                for path, raw in known.items():
                    node = by_key.get(raw)
                    if node is None or node.status == NodeStatus.UNREGISTERED:
                        raise ControlApiError(
                            f"node key {path} was registered at the SuperLink and has since "
                            "been unregistered; a key can never be registered again: "
                            "re-provision that hospital's node key"
                        )
                    out[path] = int(node.node_id)
        return {path: out[path] for path in pubkey_paths}

    def node_statuses(self) -> dict[int, str]:
        """Map node id to status (``registered``, ``online``, ``offline``...)."""
        out = self._call("supernode", "ls")
        return {int(n["node-id"]): str(n["status"]) for n in out["nodes"]}

    def submit_run(self, app_dir: Path, run_config: Mapping[str, ConfigValue] | None = None) -> int:
        """Submit the Flower app in ``app_dir`` (``flwr run``); return the run id.

        ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]``
        (unknown keys are refused by Flower). It is passed as a TOML file, so
        values need no shell quoting.
        """
        args = ["run", str(app_dir)]
        path: Path | None = None
        if run_config:
            path = self._home / f"run-config-{uuid.uuid4().hex}.toml"
            path.write_text(toml_table(run_config), encoding="utf-8")
            args += ["--run-config", str(path)]
        try:
            out = self._call(*args)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        return int(out["run-id"])

    def run_status(self, run_id: int) -> RunStatus:
        """Return the current status of ``run_id``.

        In this process, like :meth:`register_nodes`: the daemon asks every few
        seconds for the whole job, and a ``flwr ls`` process each time cost the
        coordinator host about a third of a core.
        """
        from flwr.proto.control_pb2 import ListRunsRequest

        with self._http() as client:
            out = self._rpc("ls", client.ListRuns, ListRunsRequest(run_id=run_id))
        if run_id not in out.run_dict:
            raise ControlApiError(f"the SuperLink at {self.address} knows no run {run_id}")
        status = out.run_dict[run_id].status
        return RunStatus(run_id, status.status, status.sub_status, status.details)

    def wait_run(self, run_id: int, *, timeout: float, poll_interval: float = 1.0) -> RunStatus:
        """Poll until ``run_id`` is finished; raise :class:`ControlApiError` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id)
            if status.finished:
                return status
            if time.monotonic() >= deadline:
                raise ControlApiError(
                    f"run {run_id} still {status.status!r} after {timeout:.0f} s; check the "
                    "SuperLink and SuperNode logs, or stop it with stop_run()."
                )
            time.sleep(poll_interval)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop ``run_id`` (``flwr stop``)."""
        self._call("stop", str(run_id))

    @contextlib.contextmanager
    def _http(self) -> Iterator[Any]:
        """Flower's Control API client, configured as the ``flwr`` CLI configures it."""
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )

        client = ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=self._root is None,
            root_certificates=None if self._root is None else str(self._root),
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )
        with client:
            yield client

    def _rpc(self, cmd: str, method: Callable[[Any], Any], request: Any) -> Any:
        """One Control API call; Flower's errors become :class:`ControlApiError`."""
        import httpx
        from flwr.supercore.error import FlowerError

        try:
            return method(request)
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            text = error.message if error is not None else str(exc)
            raise ControlApiError(_explain(cmd, self.address, text)) from None
        except httpx.HTTPError as exc:
            raise ControlApiError(_explain(cmd, self.address, repr(exc))) from None

    def _call(self, *args: str) -> dict[str, Any]:
        # The connection is each command's last positional; click allows it after options.
        argv = [flower_executable("flwr"), *args, self._name, "--format", "json"]
        cmd = " ".join(args[:2])
        try:
            done = subprocess.run(
                argv,
                env=flower_env(flwr_home=self._home),
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ControlApiError(
                f"`flwr {cmd}` to {self.address} did not answer in {self._timeout:.0f} s; "
                "check that the SuperLink is running."
            ) from exc
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            out = {"success": False, "error-message": (done.stdout + done.stderr).strip()}
        if not out.get("success"):
            raise ControlApiError(_explain(cmd, self.address, str(out.get("error-message"))))
        return dict(out)


class SuperLinkProcess:
    """Start, watch and stop ``flower-superlink`` plus its public Fleet gateway.

    Both run in their own sessions with output appended to log files in
    ``config.state_dir``; :meth:`stop` takes down each whole process tree
    (including the ``flower-superexec``/ServerApp processes Flower detaches).
    """

    def __init__(self, config: SuperLinkConfig) -> None:
        self.config = config
        self._link: subprocess.Popen[bytes] | None = None
        self._gateway: subprocess.Popen[bytes] | None = None
        self.control = ControlClient(
            address=config.control_address,
            root_certificates=config.ca_certfile,
            flwr_home=config.state_dir / "cli-home",
        )

    @property
    def superlink_log(self) -> Path:
        """Log file of ``flower-superlink`` (and the ServerApps it runs)."""
        return self.config.state_dir / "superlink.log"

    @property
    def gateway_log(self) -> Path:
        """Log file of the public Fleet gateway."""
        return self.config.state_dir / "fleet-gateway.log"

    @property
    def pid(self) -> int | None:
        """PID of the running ``flower-superlink`` (None when not running)."""
        proc = self._link
        return proc.pid if proc is not None and proc.poll() is None else None

    def superlink_argv(self) -> list[str]:
        """Command line of ``flower-superlink``."""
        c = self.config
        return [
            flower_executable("flower-superlink"),
            "--host", _LOOPBACK,
            "--port", str(c.control_port),
            "--ssl-certfile", str(c.certfile),
            "--ssl-keyfile", str(c.keyfile),
            "--ssl-ca-certfile", str(c.ca_certfile),
            "--enable-supernode-auth",
            "--database", str(c.database),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip

    def gateway_argv(self) -> list[str]:
        """Command line of the Fleet gateway."""
        c = self.config
        return [
            sys.executable, "-m", "fedvault.coordinator.fleet_gateway",
            "--host", c.fleet_host,
            "--port", str(c.fleet_port),
            "--upstream", c.control_address,
            "--ssl-certfile", str(c.certfile),
            "--ssl-keyfile", str(c.keyfile),
            "--ssl-ca-certfile", str(c.ca_certfile),
        ]  # fmt: skip

    def start(self) -> None:
        """Launch the SuperLink and the gateway (returns at once; see :meth:`wait_healthy`)."""
        if self.is_running():
            raise FlowerProcessError("SuperLink already running; call stop() first.")
        self.stop()  # reap a half-dead pair
        c = self.config
        for path in (c.ca_certfile, c.certfile, c.keyfile):
            if not path.is_file():
                raise InvalidConfigError(
                    f"TLS file {path} does not exist; run `fedvault provision` for this kit."
                )
        c.state_dir.mkdir(parents=True, exist_ok=True)
        env = flower_env(flwr_home=c.state_dir / "flwr-home")
        self._link = spawn(self.superlink_argv(), env=env, log_path=self.superlink_log)
        self._gateway = spawn(self.gateway_argv(), env=env, log_path=self.gateway_log)

    def is_running(self) -> bool:
        """True while both the SuperLink and the gateway processes are alive."""
        procs = (self._link, self._gateway)
        return all(p is not None and p.poll() is None for p in procs)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Block until both endpoints answer ``/health`` over verified TLS.

        Raises :class:`FlowerProcessError` (with the log tail) if a process exits
        or ``timeout`` passes first.
        """
        c = self.config
        link_ctx = ssl.create_default_context(cafile=str(c.ca_certfile))
        # The gateway may bind a public name its probe address is not in the
        # certificate for: verify the chain, not the name, for this liveness probe.
        gate_ctx = ssl.create_default_context(cafile=str(c.ca_certfile))
        gate_ctx.check_hostname = False
        gate_host = _LOOPBACK if c.fleet_host in ("0.0.0.0", "", "::") else c.fleet_host
        pending = {
            "SuperLink": (self._link, _LOOPBACK, c.control_port, link_ctx, self.superlink_log),
            "Fleet gateway": (self._gateway, gate_host, c.fleet_port, gate_ctx, self.gateway_log),
        }
        deadline = time.monotonic() + timeout
        while pending:
            for name, (proc, host, port, ctx, log) in list(pending.items()):
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise FlowerProcessError(
                        f"{name} exited (code {code}) before becoming healthy; "
                        f"see {log}:\n{log_tail(log)}"
                    )
                if _healthy(host, port, ctx, name):
                    del pending[name]
            if pending and time.monotonic() >= deadline:
                names = ", ".join(pending)
                raise FlowerProcessError(
                    f"{names} not healthy after {timeout:.0f} s; check the logs in "
                    f"{c.state_dir} and that ports {c.control_port}/{c.fleet_port} are free."
                )
            if pending:
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the gateway first (no new Fleet traffic), then the SuperLink tree."""
        for proc in (self._gateway, self._link):
            if proc is not None:
                terminate_tree(proc, grace=self.config.stop_grace)
        self._gateway = self._link = None

    def restart(self, timeout: float = 60.0) -> None:
        """Stop, start and wait until healthy (state persists in the database)."""
        self.stop()
        self.start()
        self.wait_healthy(timeout)

    def __enter__(self) -> SuperLinkProcess:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy(host: str, port: int, ctx: ssl.SSLContext, name: str) -> bool:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=2.0)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except ssl.SSLCertVerificationError as exc:
        raise FlowerProcessError(
            f"{name} on {host}:{port} presents a certificate that does not verify "
            f"({exc.verify_message}); the SuperLink certificate must be signed by the "
            "kit CA and include IP:127.0.0.1 in its subjectAltName."
        ) from exc
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _explain(cmd: str, address: str, error: str) -> str:
    hint = "check the SuperLink log."
    if "404" in error:
        hint = (
            f"{address} does not serve the Control API: it is the public Fleet gateway "
            "or not a SuperLink; use the loopback control port on the coordinator host."
        )
    elif "already in use" in error:
        hint = "a node key can be registered only once, ever; provision a new node key."
    elif "ConnectError" in error or "Connection refused" in error:
        hint = "is the SuperLink running and healthy?"
    return f"`flwr {cmd}` against {address} failed: {error.strip()}; {hint}"
