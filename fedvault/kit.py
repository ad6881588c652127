"""Provisioned kits: a signed manifest over every file a party receives.

``fedvault provision`` writes one kit per party (the coordinator, each hospital,
each operator). A kit's ``manifest.json`` names the consortium, the party and
its role, the addresses to use and the SHA-256 of every file in the kit;
``manifest.sig`` is the consortium CA's ECDSA P-384/SHA-384 signature over the
exact manifest bytes. :meth:`Kit.load` checks all of it before a daemon starts,
so a corrupted, half-copied or edited kit is refused with the name of the file
at fault instead of failing later inside TLS or HE.

The CA certificate travels inside the kit, so the signature proves integrity,
not who made the kit: pass ``expected_ca_sha256`` (printed by ``provision``) to
pin the consortium CA when a kit arrives over an untrusted channel.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fedvault.errors import FedvaultError, InvalidConfigError
from fedvault.privacy.pki import (
    Role,
    certificate_fingerprint,
    load_certificate_pem,
    load_ec_private_key_pem,
    load_x25519_private_pem,
    load_x25519_public_pem,
    verify_issued_by,
    write_public,
)

__all__ = [
    "AT_REST_KEY_BYTES",
    "AT_REST_KEY_NAME",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "FileEntry",
    "Kit",
    "KitError",
    "KitKind",
    "Manifest",
    "sign_kit",
]

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
_FORMAT = "fedvault-kit"
_VERSION = 1
_CA = "ca.pem"
_RESTORE = "re-provision or restore the kit"
AT_REST_KEY_NAME = "at-rest.key"
AT_REST_KEY_BYTES = 32


class KitError(FedvaultError):
    """A kit is missing a file, was modified, or exposes a private key."""


class KitKind(StrEnum):
    """Which party a kit belongs to."""

    COORDINATOR = "coordinator"
    HOSPITAL = "hospital"
    OPERATOR = "operator"


# Leaf certificate and its TLS/signing key, by kit kind.
_LEAF = {
    KitKind.COORDINATOR: ("coordinator.pem", "coordinator.key"),
    KitKind.HOSPITAL: ("hospital.pem", "hospital.key"),
    KitKind.OPERATOR: ("operator.pem", "operator.key"),
}


@dataclass(frozen=True)
class FileEntry:
    """One kit file: its SHA-256 and whether it is a private key (must be 0600)."""

    sha256: str
    secret: bool = False


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The signed description of one kit."""

    consortium: str
    kind: KitKind
    party: str
    role: Role | None
    coordinator: str
    operator_api: str
    custodian: str
    hospitals: tuple[str, ...]
    operators: Mapping[str, Role]
    ca_sha256: str
    created: str
    files: Mapping[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys), the exact bytes the CA signs."""
        obj = {
            "format": _FORMAT,
            "version": _VERSION,
            "consortium": self.consortium,
            "kind": self.kind.value,
            "party": self.party,
            "role": None if self.role is None else self.role.value,
            "level": None if self.role is None else self.role.level,
            "coordinator": self.coordinator,
            "operator_api": self.operator_api,
            "custodian": self.custodian,
            "hospitals": list(self.hospitals),
            "operators": {k: v.value for k, v in sorted(self.operators.items())},
            "ca_sha256": self.ca_sha256,
            "created": self.created,
            "files": {
                k: {"sha256": v.sha256, "secret": v.secret} for k, v in sorted(self.files.items())
            },
        }
        return json.dumps(obj, sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest; raises ``ValueError``/``KeyError``/``TypeError`` when malformed."""
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise ValueError("not a fedvault kit manifest")
        if obj.get("version") != _VERSION:
            raise ValueError(f"unsupported manifest version {obj.get('version')!r}")
        files = {}
        for name, entry in obj["files"].items():
            if not isinstance(entry["sha256"], str) or not isinstance(entry["secret"], bool):
                raise TypeError(f"bad entry for {name}")
            files[_safe_relpath(name)] = FileEntry(entry["sha256"], entry["secret"])
        strings = ("consortium", "party", "coordinator", "operator_api", "custodian", "ca_sha256")
        if not all(isinstance(obj[k], str) for k in strings):
            raise TypeError("manifest fields must be strings")
        return cls(
            consortium=obj["consortium"],
            kind=KitKind(obj["kind"]),
            party=obj["party"],
            role=None if obj["role"] is None else Role(obj["role"]),
            coordinator=obj["coordinator"],
            operator_api=obj["operator_api"],
            custodian=obj["custodian"],
            hospitals=tuple(str(h) for h in obj["hospitals"]),
            operators=MappingProxyType({str(k): Role(v) for k, v in obj["operators"].items()}),
            ca_sha256=obj["ca_sha256"],
            created=str(obj["created"]),
            files=MappingProxyType(files),
        )


def _safe_relpath(name: str) -> str:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or str(p) != name:
        raise ValueError(f"unsafe file name {name!r} in manifest")
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _failure(root: Path, what: str) -> KitError:
    return KitError(f"kit {root} failed verification: {what}; {_RESTORE}")


def sign_kit(
    kit_dir: Path,
    manifest: Manifest,
    *,
    secret_files: Iterable[str],
    ca_key: ec.EllipticCurvePrivateKey,
) -> Manifest:
    """Hash every file under ``kit_dir``, then write ``manifest.json`` and ``manifest.sig``.

    ``secret_files`` (relative names) are marked as private keys, which
    :meth:`Kit.load` requires to be mode 0600.
    """
    secret = set(secret_files)
    files: dict[str, FileEntry] = {}
    for path in sorted(kit_dir.rglob("*")):
        rel = path.relative_to(kit_dir).as_posix()
        if path.is_file() and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
            files[rel] = FileEntry(_sha256(path), rel in secret)
    missing = secret - files.keys()
    if missing:
        raise InvalidConfigError(f"secret files {sorted(missing)} are not in kit {kit_dir}")
    signed = replace(manifest, files=MappingProxyType(files))
    data = signed.to_json()
    signature = ca_key.sign(data, ec.ECDSA(hashes.SHA384()))
    write_public(kit_dir / MANIFEST_NAME, data)
    write_public(kit_dir / SIGNATURE_NAME, base64.b64encode(signature) + b"\n")
    return signed


def _verify_signed_manifest(
    root: Path, expected_ca_sha256: str | None
) -> tuple[x509.Certificate, Manifest]:
    """Check the manifest signature against the kit's CA, parse it, and check the CA pin."""

    def fail(what: str) -> KitError:
        return _failure(root, what)

    raw: dict[str, bytes] = {}
    for name in (_CA, MANIFEST_NAME, SIGNATURE_NAME):
        try:
            raw[name] = (root / name).read_bytes()
        except OSError:
            raise fail(f"{name} is missing") from None
    try:
        ca_cert = load_certificate_pem(raw[_CA], what=_CA)
        signature = base64.b64decode(raw[SIGNATURE_NAME].strip(), validate=True)
        public = ca_cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public.verify(signature, raw[MANIFEST_NAME], ec.ECDSA(hashes.SHA384()))
    except (InvalidConfigError, InvalidSignature, ValueError, binascii.Error):
        raise fail(
            f"{MANIFEST_NAME} was modified (its signature in {SIGNATURE_NAME} does not verify "
            f"against {_CA}; one of the three was changed)"
        ) from None
    try:
        manifest = Manifest.from_json(raw[MANIFEST_NAME])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise fail(f"{MANIFEST_NAME} is signed but cannot be read ({exc})") from None
    fingerprint = certificate_fingerprint(ca_cert)
    if manifest.ca_sha256 != fingerprint:
        raise fail(f"{_CA} was modified (fingerprint differs from the manifest)")
    if expected_ca_sha256 is not None and expected_ca_sha256.lower() != fingerprint:
        raise KitError(
            f"kit {root} belongs to CA {fingerprint}, not the pinned CA {expected_ca_sha256}; "
            "use the kit of your consortium"
        )
    return ca_cert, manifest


def _verify_files(root: Path, manifest: Manifest) -> None:
    """Check every listed file's SHA-256, then mode 0600 on the private keys."""
    for name, entry in manifest.files.items():
        path = root / name
        if path.is_symlink() or not path.is_file():
            raise _failure(root, f"{name} is missing (or a symlink)")
        if _sha256(path) != entry.sha256:
            raise _failure(root, f"{name} was modified")
    for name, entry in manifest.files.items():
        mode = (root / name).stat().st_mode & 0o777
        if entry.secret and mode & 0o077:
            raise KitError(
                f"kit {root}: private key {name} is readable by group/others (mode "
                f"{mode:04o}); run `chmod 600 {root / name}` and check who copied it"
            )


@dataclass(frozen=True)
class Kit:
    """A verified kit: typed paths and the parsed manifest. Build with :meth:`load`."""

    root: Path
    manifest: Manifest
    ca_cert: x509.Certificate

    @classmethod
    def load(
        cls,
        kit_dir: str | os.PathLike[str],
        *,
        expected_kind: KitKind | None = None,
        expected_ca_sha256: str | None = None,
    ) -> Kit:
        """Verify and open a kit.

        Checks, in order: the manifest signature against the kit's ``ca.pem``,
        the SHA-256 of every listed file, mode 0600 on private keys, the party's
        certificate chain, and (optionally) the kit kind and the CA pin.

        Raises
        ------
        KitError
            Naming the file at fault and what to do.
        """
        root = Path(kit_dir)
        if not root.is_dir():
            raise KitError(
                f"kit {root} is not a directory; pass the kit folder `fedvault provision` wrote"
            )
        ca_cert, manifest = _verify_signed_manifest(root, expected_ca_sha256)
        _verify_files(root, manifest)
        kit = cls(root, manifest, ca_cert)
        if expected_kind is not None and manifest.kind is not expected_kind:
            raise KitError(
                f"kit {root} is the {manifest.kind.value} kit of {manifest.party!r}, not a "
                f"{expected_kind.value} kit; pass the {expected_kind.value}'s own kit"
            )
        try:
            verify_issued_by(kit.certificate(), ca_cert)
        except InvalidConfigError as exc:
            raise _failure(root, str(exc)) from None
        return kit

    # ---- reading files -------------------------------------------------------------

    def path(self, name: str) -> Path:
        """Absolute path of a file the manifest lists (``KitError`` if it lists no such file)."""
        if name not in self.manifest.files:
            raise KitError(
                f"kit {self.root} ({self.kind.value} {self.party!r}) has no {name}; "
                "use the right party's kit"
            )
        return self.root / name

    def read(self, name: str) -> bytes:
        """Read a listed file and check its hash again (it may have changed since load)."""
        data = self.path(name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest.files[name].sha256:
            raise _failure(self.root, f"{name} was modified")
        return data

    # ---- manifest fields -------------------------------------------------------------

    @property
    def kind(self) -> KitKind:
        """Whose kit this is: the coordinator's, a hospital's or an operator's."""
        return self.manifest.kind

    @property
    def party(self) -> str:
        """The name of the party the kit belongs to."""
        return self.manifest.party

    @property
    def consortium(self) -> str:
        """The name of the consortium."""
        return self.manifest.consortium

    @property
    def role(self) -> Role | None:
        """The operator's role (``None`` for coordinator and hospital kits)."""
        return self.manifest.role

    @property
    def coordinator_address(self) -> str:
        """The coordinator's Fleet API address (``host:port``) hospitals connect to."""
        return self.manifest.coordinator

    @property
    def operator_api_address(self) -> str:
        """The coordinator's operator API address (``host:port``)."""
        return self.manifest.operator_api

    @property
    def custodian(self) -> str:
        """The hospital that generates the HE secret key (the key custodian)."""
        return self.manifest.custodian

    @property
    def is_custodian(self) -> bool:
        """Whether this is the hospital that generates the HE secret key."""
        return self.kind is KitKind.HOSPITAL and self.party == self.custodian

    # ---- typed accessors -------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The consortium CA's certificate."""
        return self.path(_CA)

    @property
    def cert_path(self) -> Path:
        """The party's certificate (TLS server, hospital or operator client)."""
        return self.path(_LEAF[self.kind][0])

    @property
    def key_path(self) -> Path:
        """Private key of :attr:`cert_path` (mode 0600)."""
        return self.path(_LEAF[self.kind][1])

    def certificate(self) -> x509.Certificate:
        """The party's certificate, read and checked against the manifest."""
        return load_certificate_pem(self.read(_LEAF[self.kind][0]), what=_LEAF[self.kind][0])

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The TLS/signing key; a hospital signs its sealed-key envelopes with it."""
        name = _LEAF[self.kind][1]
        return load_ec_private_key_pem(self.read(name), what=name)

    @property
    def node_key_path(self) -> Path:
        """Hospital: OpenSSH private key for ``--auth-supernode-private-key``."""
        return self.path("node.key")

    @property
    def node_pub_path(self) -> Path:
        """Hospital: OpenSSH public key, the one registered with ``flwr supernode register``."""
        return self.path("node.pub")

    def node_public_key_paths(self) -> dict[str, Path]:
        """Coordinator: every hospital's node public key, to register with Flower."""
        return {h: self.path(f"nodes/{h}.pub") for h in self.manifest.hospitals}

    def seal_private_key(self) -> x25519.X25519PrivateKey:
        """Hospital: its X25519 key for opening sealed HE contexts."""
        return load_x25519_private_pem(self.read("seal.key"))

    def seal_public_keys(self) -> dict[str, x25519.X25519PublicKey]:
        """Every hospital's enrolled X25519 key, as signed into this kit.

        A custodian seals to these, never to keys the relay hands it.
        """
        pattern = "peers/{}.seal.pub" if self.kind is KitKind.HOSPITAL else "seal/{}.pub"
        out = {}
        for hospital in self.manifest.hospitals:
            name = pattern.format(hospital)
            out[hospital] = load_x25519_public_pem(self.read(name), what=name)
        return out

    def at_rest_key(self) -> bytes:
        """Coordinator: the 32-byte AES-256-GCM key that encrypts the round store at rest.

        Pass it as ``RoundStore(url, at_rest_key=...)``; only the coordinator kit
        holds it (mode 0600), so a copy of the database alone reveals no
        plaintext model or accountant state.
        """
        if self.kind is not KitKind.COORDINATOR or AT_REST_KEY_NAME not in self.manifest.files:
            raise KitError(
                f"kit {self.root} ({self.kind.value} {self.party!r}) has no {AT_REST_KEY_NAME}: "
                "only a coordinator kit provisioned by this fedvault has one; pass the "
                "coordinator kit, or re-provision an older one"
            )
        key = self.read(AT_REST_KEY_NAME)
        if len(key) != AT_REST_KEY_BYTES:
            raise _failure(
                self.root, f"{AT_REST_KEY_NAME} holds {len(key)} bytes, not {AT_REST_KEY_BYTES}"
            )
        return key
