"""``fedvault provision``: a consortium's CA, certificates, node keys and kits.

Reads a small TOML file (see ``examples/consortium.toml``) and writes::

    OUT/ca/                 ca.pem, ca.key (0600)  — stays with the provisioner
    OUT/coordinator/        ca.pem, coordinator.pem, coordinator.key (0600),
                            at-rest.key (0600: 32 random bytes, AES-256-GCM key of the
                            round store's plaintext blobs, see coordinator/at_rest.py),
                            nodes/<hospital>.pub (register with `flwr supernode register`),
                            seal/<hospital>.pub (X25519, enrolled for the key ceremony),
                            manifest.json, manifest.sig
    OUT/hospitals/<name>/   ca.pem, node.key (0600), node.pub, seal.key (0600), seal.pub,
                            hospital.pem, hospital.key (0600), peers/<hospital>.seal.pub,
                            manifest.json, manifest.sig
    OUT/operators/<name>/   ca.pem, operator.pem, operator.key (0600), manifest.json, manifest.sig

Each private key exists in exactly one kit. The provisioner generates no HE
key at all: the custodian hospital does, and seals it to the other hospitals'
``seal.pub`` (see :mod:`fedvault.privacy.sealing`), so whoever runs this command
never holds the consortium's decryption key.

Everything is built in a hidden sibling directory and renamed into place, so a
failure leaves no half-written ``OUT``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedvault.durable import replace_dir
from fedvault.errors import InvalidConfigError
from fedvault.kit import AT_REST_KEY_BYTES, AT_REST_KEY_NAME, KitKind, Manifest, sign_kit
from fedvault.privacy.pki import (
    Role,
    certificate_fingerprint,
    certificate_to_pem,
    create_ca,
    generate_node_keypair,
    generate_x25519_keypair,
    issue_client_cert,
    issue_server_cert,
    private_key_to_pem,
    public_key_to_pem,
    write_public,
    write_secret,
)

__all__ = [
    "Address",
    "ConsortiumConfig",
    "OperatorSpec",
    "ProvisionResult",
    "load_consortium",
    "parse_consortium",
    "provision",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_RESERVED = {"ca", "coordinator"}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


@dataclass(frozen=True)
class Address:
    """A ``host:port`` that hospitals and operators connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: object, *, field: str) -> Address:
        """Parse ``host:port`` or ``[ipv6]:port``, refusing bind-all addresses."""
        m = None
        if isinstance(text, str):
            m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
        if m is None:
            raise InvalidConfigError(
                f"{field} = {text!r} is not 'host:port' (e.g. '127.0.0.1:9092')"
            )
        host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
        _require(1 <= int(port) <= 65535, f"{field} = {text!r}: port must be in 1..65535")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            _require(
                bool(_DNS.match(host)), f"{field} = {text!r}: {host!r} is not an IP or host name"
            )
        else:
            _require(
                not ip.is_unspecified,
                f"{field} = {text!r}: {host} is a bind-all address; give the address that "
                "hospitals connect to (the TLS certificate is issued for it)",
            )
        return cls(host, int(port))


@dataclass(frozen=True)
class OperatorSpec:
    """An operator and the role their certificate carries."""

    name: str
    role: Role


@dataclass(frozen=True, kw_only=True)
class ConsortiumConfig:
    """A validated consortium definition."""

    name: str
    coordinator: Address
    operator_api: Address
    custodian: str
    hospitals: tuple[str, ...]
    operators: tuple[OperatorSpec, ...]


def _table(data: object, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{where} is missing or not a table")
    unknown = sorted(set(data) - allowed)
    _require(not unknown, f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return data


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidConfigError(
            f"{where} = {value!r} is not a valid name: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse_consortium(data: Mapping[str, object], *, source: str = "consortium") -> ConsortiumConfig:
    """Validate a parsed TOML document (see ``examples/consortium.toml``)."""
    top = _table(data, source, {"consortium", "hospitals", "operators"})
    c = _table(
        top.get("consortium"),
        f"{source}: [consortium]",
        {"name", "coordinator", "operator_api", "custodian"},
    )
    name = _name(c.get("name"), "[consortium] name")
    coordinator = Address.parse(c.get("coordinator"), field="[consortium] coordinator")
    operator_api = Address.parse(c.get("operator_api"), field="[consortium] operator_api")
    _require(
        coordinator != operator_api,
        f"[consortium] coordinator and operator_api are both {coordinator}; give the operator "
        "API its own port",
    )
    raw_hospitals = top.get("hospitals", [])
    _require(
        isinstance(raw_hospitals, list) and len(raw_hospitals) > 0,
        f"{source}: add at least one [[hospitals]] entry with a name",
    )
    hospitals = tuple(
        _name(
            _table(h, f"[[hospitals]] #{i + 1}", {"name"}).get("name"),
            f"[[hospitals]] #{i + 1} name",
        )
        for i, h in enumerate(raw_hospitals)
    )
    raw_operators = top.get("operators", [])
    _require(isinstance(raw_operators, list), f"{source}: operators must be [[operators]] entries")
    operators = []
    for i, o in enumerate(raw_operators):
        t = _table(o, f"[[operators]] #{i + 1}", {"name", "role"})
        role = t.get("role")
        _require(
            isinstance(role, str),
            f"[[operators]] #{i + 1} needs role = admin|engineer|auditor|guest",
        )
        operators.append(
            OperatorSpec(
                _name(t.get("name"), f"[[operators]] #{i + 1} name"), Role.parse(str(role))
            )
        )
    # Names become directory names and certificate CNs: they must be unique across
    # parties, or an operator certificate could carry a hospital's name.
    seen: set[str] = set()
    for party in (*hospitals, *(o.name for o in operators)):
        _require(party.lower() not in _RESERVED, f"name {party!r} is reserved; choose another")
        _require(
            party.lower() not in seen,
            f"duplicate name {party!r}: hospital and operator names must be unique",
        )
        seen.add(party.lower())
    custodian = _name(c.get("custodian"), "[consortium] custodian")
    _require(
        custodian in hospitals,
        f"[consortium] custodian = {custodian!r} is not one of the hospitals {list(hospitals)}; "
        "the custodian must be a hospital (it generates the HE secret key)",
    )
    return ConsortiumConfig(
        name=name,
        coordinator=coordinator,
        operator_api=operator_api,
        custodian=custodian,
        hospitals=hospitals,
        operators=tuple(operators),
    )


def load_consortium(path: str | os.PathLike[str]) -> ConsortiumConfig:
    """Read and validate a consortium TOML file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidConfigError(
            f"consortium file {p} does not exist; see examples/consortium.toml"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(f"{p} is not valid TOML ({exc}); fix the syntax") from None
    return parse_consortium(data, source=str(p))


@dataclass(frozen=True, kw_only=True)
class ProvisionResult:
    """Where the kits went, and the CA fingerprint to pin out of band."""

    out_dir: Path
    config: ConsortiumConfig
    ca_sha256: str
    ca_dir: Path
    coordinator_kit: Path
    hospital_kits: Mapping[str, Path]
    operator_kits: Mapping[str, Path]


class _KitWriter:
    """Writes the kits of one consortium, all signed by one CA."""

    def __init__(self, root: Path, config: ConsortiumConfig) -> None:
        self.root = root
        self.config = config
        self.ca, self.ca_key = create_ca(config.name)
        self.ca_pem = certificate_to_pem(self.ca)
        self.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    def sign(
        self, kit: Path, kind: KitKind, party: str, role: Role | None, secrets: list[str]
    ) -> None:
        c = self.config
        manifest = Manifest(
            consortium=c.name,
            kind=kind,
            party=party,
            role=role,
            coordinator=str(c.coordinator),
            operator_api=str(c.operator_api),
            custodian=c.custodian,
            hospitals=c.hospitals,
            operators=MappingProxyType({o.name: o.role for o in c.operators}),
            ca_sha256=certificate_fingerprint(self.ca),
            created=self.created,
        )
        sign_kit(kit, manifest, secret_files=secrets, ca_key=self.ca_key)

    def leaf(
        self, kit: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        write_public(kit / "ca.pem", self.ca_pem)
        write_public(kit / f"{stem}.pem", certificate_to_pem(cert))
        write_secret(kit / f"{stem}.key", private_key_to_pem(key))


def provision(
    toml_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> ProvisionResult:
    """Create the consortium CA and every party's kit under ``out_dir``.

    Raises
    ------
    InvalidConfigError
        The TOML is invalid, or ``out_dir`` exists and is not empty (kits are
        never overwritten: re-provisioning issues new keys, which Flower refuses
        to register twice).
    """
    config = load_consortium(toml_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidConfigError(
            f"refusing to overwrite {out}: it exists and is not empty; choose a new --out "
            "directory (existing kits stay valid)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.provisioning-", dir=out.parent))
    try:
        fingerprint = _write_all(staging, config)
        # An empty directory is replaced atomically on POSIX; every key file and
        # folder is flushed first and the parent after, so a power cut cannot
        # leave an OUT whose keys are missing or empty.
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ProvisionResult(
        out_dir=out,
        config=config,
        ca_sha256=fingerprint,
        ca_dir=out / "ca",
        coordinator_kit=out / "coordinator",
        hospital_kits=MappingProxyType({h: out / "hospitals" / h for h in config.hospitals}),
        operator_kits=MappingProxyType(
            {o.name: out / "operators" / o.name for o in config.operators}
        ),
    )


def _write_all(root: Path, config: ConsortiumConfig) -> str:
    w = _KitWriter(root, config)
    write_public(root / "ca" / "ca.pem", w.ca_pem)
    write_secret(root / "ca" / "ca.key", private_key_to_pem(w.ca_key))

    # Coordinator: server certificate for both of its endpoints.
    hosts = [config.coordinator.host, config.operator_api.host]
    extra_ips, extra_dns = [], []
    for host in hosts[1:]:
        try:
            ipaddress.ip_address(host)
            extra_ips.append(host)
        except ValueError:
            extra_dns.append(host)
    coord = root / "coordinator"
    w.leaf(
        coord,
        "coordinator",
        *issue_server_cert(w.ca, w.ca_key, hosts[0], ips=extra_ips, dns=extra_dns),
    )

    seal_pubs: dict[str, bytes] = {}
    for h in config.hospitals:
        kit = root / "hospitals" / h
        node = generate_node_keypair(comment=f"{h}@{config.name}")
        seal_key, seal_pub = generate_x25519_keypair()
        seal_pubs[h] = public_key_to_pem(seal_pub)
        w.leaf(kit, "hospital", *issue_client_cert(w.ca, w.ca_key, h, hospital=True))
        write_secret(kit / "node.key", node.private_openssh)
        write_public(kit / "node.pub", node.public_openssh)
        write_secret(kit / "seal.key", private_key_to_pem(seal_key))
        write_public(kit / "seal.pub", seal_pubs[h])
        write_public(coord / "nodes" / f"{h}.pub", node.public_openssh)
        write_public(coord / "seal" / f"{h}.pub", seal_pubs[h])
    for h in config.hospitals:
        kit = root / "hospitals" / h
        for peer, pem in seal_pubs.items():
            write_public(kit / "peers" / f"{peer}.seal.pub", pem)
        w.sign(kit, KitKind.HOSPITAL, h, None, ["hospital.key", "node.key", "seal.key"])
    # Encrypts the store's plaintext blobs at rest; it never leaves the coordinator kit.
    write_secret(coord / AT_REST_KEY_NAME, secrets.token_bytes(AT_REST_KEY_BYTES))
    w.sign(coord, KitKind.COORDINATOR, "coordinator", None, ["coordinator.key", AT_REST_KEY_NAME])

    for o in config.operators:
        kit = root / "operators" / o.name
        w.leaf(kit, "operator", *issue_client_cert(w.ca, w.ca_key, o.name, role=o.role))
        w.sign(kit, KitKind.OPERATOR, o.name, o.role, ["operator.key"])
    return certificate_fingerprint(w.ca)
