"""Consortium PKI: a CA, TLS certificates, node keys and key-sealing keys.

Everything here is built from :mod:`cryptography` primitives; fedvault adds no
home-made cryptography. The consortium CA signs three kinds of leaf:

* the coordinator's TLS server certificate (SAN ``IP:127.0.0.1``,
  ``DNS:localhost`` and its real host, because Flower's loopback clients check
  the SAN);
* one client certificate per hospital (subject ``OU=party:hospital``), whose key
  also signs the sealed-key envelopes a custodian hospital sends, so a
  recipient can tell a genuine ceremony from one forged by the relay;
* one client certificate per operator carrying exactly one :class:`Role`.

**Role encoding.** An operator's role is the subject attribute
``OU=role:<role>`` (e.g. ``OU=role:auditor``). A subject attribute is covered by
the CA signature like any extension, stays readable with ``openssl x509 -text``
and needs no private OID. :func:`role_from_certificate` reads it back.

Node-authentication keys follow what Flower 1.41 loads: ``flower-supernode
--auth-supernode-private-key`` calls ``load_ssh_private_key`` (so the private key
is in OpenSSH format) and ``flwr supernode register KEY.pub`` calls
``load_ssh_public_key`` and demands a NIST curve; both get ECDSA P-384.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.durable import atomic_write
from fedvault.errors import InvalidConfigError

__all__ = [
    "HOSPITAL_UNIT",
    "ROLE_PREFIX",
    "NodeKeyPair",
    "Role",
    "certificate_fingerprint",
    "certificate_to_pem",
    "common_name",
    "create_ca",
    "generate_node_keypair",
    "generate_x25519_keypair",
    "is_hospital_certificate",
    "issue_client_cert",
    "issue_server_cert",
    "load_certificate_pem",
    "load_ec_private_key_pem",
    "load_x25519_private_pem",
    "load_x25519_public_pem",
    "private_key_to_pem",
    "public_key_to_pem",
    "role_from_certificate",
    "verify_issued_by",
    "write_public",
    "write_secret",
]

#: Prefix of the subject ``OU`` attribute that carries an operator's role.
ROLE_PREFIX = "role:"
#: Subject ``OU`` attribute of a hospital's client certificate.
HOSPITAL_UNIT = "party:hospital"

_CURVE = ec.SECP384R1  # NIST P-384: accepted by Flower's node auth and by TLS stacks
_SIGNATURE_HASH = hashes.SHA384
_CA_LIFETIME = dt.timedelta(days=5 * 365)
_LEAF_LIFETIME = dt.timedelta(days=2 * 365)
_CLOCK_SKEW = dt.timedelta(minutes=5)  # tolerate hosts whose clocks lag a little


class Role(StrEnum):
    """Operator roles, the access levels L4..L1 of a consortium's access matrix."""

    ADMIN = "admin"
    ENGINEER = "engineer"
    AUDITOR = "auditor"
    GUEST = "guest"

    @property
    def level(self) -> int:
        """Access level: admin 4, engineer 3, auditor 2, guest 1."""
        return _LEVELS[self]

    def allows(self, required: Role) -> bool:
        """Whether this role reaches the level of ``required`` (levels are ordered)."""
        return self.level >= required.level

    @classmethod
    def parse(cls, text: str) -> Role:
        """Parse a role name, refusing anything but the four known roles."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InvalidConfigError(
                f"unknown operator role {text!r}: choose one of {choices}"
            ) from None


_LEVELS = {Role.ADMIN: 4, Role.ENGINEER: 3, Role.AUDITOR: 2, Role.GUEST: 1}


class NodeKeyPair(NamedTuple):
    """A SuperNode authentication key pair, both halves in OpenSSH encoding."""

    private_openssh: bytes  # ``-----BEGIN OPENSSH PRIVATE KEY-----`` (unencrypted)
    public_openssh: bytes  # ``ecdsa-sha2-nistp384 AAAA... comment\n``


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common: str, *, organization: str | None, unit: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common))
    return x509.Name(attrs)


def _organization(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else None


def common_name(cert: x509.Certificate) -> str:
    """The subject common name, or ``""`` when the certificate has none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    lifetime_end: dt.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    # Key usage: a CA signs certificates, CRLs and (digital_signature) kit
    # manifests; a leaf only signs (ECDHE handshakes, envelopes).
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _CLOCK_SKEW)
        .not_valid_after(lifetime_end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def create_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed consortium CA (ECDSA P-384, valid five years).

    ``path_length=0``: the CA signs leaves only, so a stolen leaf key can never
    mint further certificates.
    """
    if not name:
        raise InvalidConfigError("the CA needs a non-empty consortium name")
    key = ec.generate_private_key(_CURVE())
    subject = _name(f"{name} CA", organization=name)
    builder = _builder(subject, subject, key.public_key(), _now() + _CA_LIFETIME, ca=True)
    return builder.sign(key, _SIGNATURE_HASH()), key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(_CURVE())
    # A leaf never outlives its CA: verifiers would reject the tail anyway.
    not_after = min(_now() + _LEAF_LIFETIME, ca.not_valid_after_utc)
    builder = (
        _builder(subject, ca.subject, key.public_key(), not_after, ca=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, _SIGNATURE_HASH()), key


def issue_server_cert(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    host: str,
    *,
    ips: Iterable[str] = (),
    dns: Iterable[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue the coordinator's TLS server certificate (EKU serverAuth).

    The SAN always holds ``IP:127.0.0.1`` and ``DNS:localhost`` (loopback runs
    and health checks) plus ``host`` — as an IP entry if it parses as one — and
    every extra entry of ``ips`` and ``dns``.
    """
    if not host:
        raise InvalidConfigError("issue_server_cert needs the coordinator's host")
    try:
        ip_texts, dns_names = ["127.0.0.1", str(ipaddress.ip_address(host)), *ips], ["localhost"]
    except ValueError:
        ip_texts, dns_names = ["127.0.0.1", *ips], ["localhost", host]
    try:
        addrs = [ipaddress.ip_address(t) for t in ip_texts]
    except ValueError as exc:
        raise InvalidConfigError(f"ips=: {exc}; pass host names in dns=") from None
    entries: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([*dns_names, *dns])]
    entries += [x509.IPAddress(a) for a in dict.fromkeys(addrs)]  # dict: dedup, keep order
    subject = _name(host, organization=_organization(ca), unit="party:coordinator")
    return _leaf(
        ca, ca_key, subject, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(entries)
    )


def issue_client_cert(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    role: Role | None = None,
    hospital: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a client certificate (EKU clientAuth) for an operator or a hospital.

    Exactly one of ``role`` (an operator, ``OU=role:<role>``) or ``hospital=True``
    (``OU=party:hospital``) must be given: a certificate that could pass for both
    would let an operator sign a key ceremony in a hospital's name.
    """
    if not common_name:
        raise InvalidConfigError("a client certificate needs a non-empty common name")
    if role is None and hospital:
        unit = HOSPITAL_UNIT
    elif role is not None and not hospital:
        unit = f"{ROLE_PREFIX}{Role(role).value}"
    else:
        raise InvalidConfigError("issue_client_cert: give exactly one of role=... or hospital=True")
    subject = _name(common_name, organization=_organization(ca), unit=unit)
    return _leaf(ca, ca_key, subject, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def _units(cert: x509.Certificate) -> list[str]:
    return [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]


def role_from_certificate(cert: x509.Certificate) -> Role:
    """Read the operator role (``OU=role:<role>``) from a certificate.

    Raises
    ------
    InvalidConfigError
        No role, several roles, or a role fedvault does not know.
    """
    roles = [u[len(ROLE_PREFIX) :] for u in _units(cert) if u.startswith(ROLE_PREFIX)]
    who = common_name(cert) or cert.subject.rfc4514_string()
    if not roles:
        raise InvalidConfigError(
            f"certificate of {who!r} carries no operator role (expected subject OU=role:<admin|"
            "engineer|auditor|guest>); use an operator certificate issued by `fedvault provision`"
        )
    if len(roles) > 1:
        raise InvalidConfigError(
            f"certificate of {who!r} carries several roles {roles}; re-issue it with exactly one"
        )
    try:
        return Role(roles[0])
    except ValueError:
        choices = ", ".join(m.value for m in Role)
        raise InvalidConfigError(
            f"certificate of {who!r} carries unknown role {roles[0]!r} (known: {choices}); "
            "re-issue it with `fedvault provision`"
        ) from None


def is_hospital_certificate(cert: x509.Certificate) -> bool:
    """Whether ``cert`` was issued to a hospital (``OU=party:hospital``), not an operator."""
    units = _units(cert)
    return HOSPITAL_UNIT in units and not any(u.startswith(ROLE_PREFIX) for u in units)


def verify_issued_by(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, at: dt.datetime | None = None
) -> None:
    """Check that ``ca_cert`` is a CA, signed ``cert``, and both are valid at ``at`` (now).

    Raises
    ------
    InvalidConfigError
        With the reason, and what to do about it.
    """
    when = at or _now()
    who = common_name(cert) or cert.subject.rfc4514_string()
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InvalidConfigError(
            f"{common_name(ca_cert)!r} is not a CA certificate; use the consortium's ca.pem"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidConfigError(
            f"certificate of {who!r} was not issued by CA {common_name(ca_cert)!r}; "
            "use the certificate and ca.pem from the same `fedvault provision` run"
        ) from None
    for c in (ca_cert, cert):
        if not c.not_valid_before_utc <= when <= c.not_valid_after_utc:
            raise InvalidConfigError(
                f"certificate {common_name(c)!r} is valid only from "
                f"{c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d}; "
                "check the clock or re-provision"
            )


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex: what an operator pins out of band."""
    return cert.fingerprint(hashes.SHA256()).hex()


def generate_node_keypair(*, comment: str = "") -> NodeKeyPair:
    """An ECDSA P-384 SuperNode authentication key pair in Flower's formats.

    The private half loads with ``serialization.load_ssh_private_key`` (what
    ``flower-supernode --auth-supernode-private-key`` calls), the public half with
    ``load_ssh_public_key`` (what ``flwr supernode register KEY.pub`` calls).
    ``comment`` is appended to the public line, as ``ssh-keygen -C`` does, so an
    operator can tell registered keys apart.
    """
    if any(c.isspace() for c in comment):
        raise InvalidConfigError(f"node key comment {comment!r} must not contain whitespace")
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public += b" " + comment.encode()
    return NodeKeyPair(private, public + b"\n")


def generate_x25519_keypair() -> tuple[x25519.X25519PrivateKey, x25519.X25519PublicKey]:
    """A fresh X25519 key pair for receiving sealed HE secret contexts."""
    key = x25519.X25519PrivateKey.generate()
    return key, key.public_key()


def certificate_to_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_to_pem(key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (protected by file mode 0600, as TLS daemons expect)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_to_pem(key: ec.EllipticCurvePublicKey | x25519.X25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_certificate_pem(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Parse one PEM certificate, with an error that names ``what``."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise InvalidConfigError(
            f"{what} is not a PEM certificate; copy it again from the provisioned kit"
        ) from None


def _load_private(data: bytes) -> object:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def load_ec_private_key_pem(
    data: bytes, *, what: str = "private key"
) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM EC private key (TLS and signing keys)."""
    key = _load_private(data)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidConfigError(
            f"{what} is not an unencrypted PEM EC private key; restore the kit"
        )
    return key


def load_x25519_private_pem(data: bytes, *, what: str = "seal.key") -> x25519.X25519PrivateKey:
    """Parse a PEM X25519 private key (a hospital's ``seal.key``)."""
    key = _load_private(data)
    if not isinstance(key, x25519.X25519PrivateKey):
        raise InvalidConfigError(f"{what} is not a PEM X25519 private key; restore the kit")
    return key


def load_x25519_public_pem(data: bytes, *, what: str = "seal.pub") -> x25519.X25519PublicKey:
    """Parse a PEM X25519 public key (a hospital's enrolled ``seal.pub``)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, x25519.X25519PublicKey):
        raise InvalidConfigError(f"{what} is not a PEM X25519 public key; restore the kit")
    return key


def _make_private_dirs(directory: Path) -> None:
    # Create missing parents one by one with 0700 (chmod defeats an odd umask);
    # directories that already exist (e.g. /tmp) are left as they are.
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)


def _write(path: str | os.PathLike[str], data: bytes, mode: int) -> Path:
    p = Path(path)
    _make_private_dirs(p.parent)
    # A temp file with the mode from its first byte, fsynced, renamed over the
    # target (a symlink there is replaced, not followed), then the directory
    # fsynced: a crash leaves the old file or the new one, never a torn key.
    atomic_write(p, data, mode)
    return p


def write_secret(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a private key file that is mode 0600 from its first byte.

    The temp file gets the mode before any byte is written, closing the window
    in which ``open(); chmod()`` leaves a fresh key world-readable; a file that
    existed with a looser mode is replaced by one with 0600. Missing parent
    directories are created 0700.
    """
    return _write(path, data, 0o600)


def write_public(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write a public file (certificate, public key, manifest) with mode 0644."""
    return _write(path, data, 0o644)
