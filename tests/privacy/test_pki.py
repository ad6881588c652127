"""Consortium PKI: certificate chains, roles, Flower node-key formats, secret files."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.errors import InvalidConfigError
from fedvault.privacy.pki import (
    NodeKeyPair,
    Role,
    create_ca,
    generate_node_keypair,
    generate_x25519_keypair,
    is_hospital_certificate,
    issue_client_cert,
    issue_server_cert,
    load_x25519_private_pem,
    load_x25519_public_pem,
    private_key_to_pem,
    public_key_to_pem,
    role_from_certificate,
    verify_issued_by,
    write_secret,
)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return create_ca("test-consortium")


def test_ca_is_p384_five_year_ca(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = ca
    assert isinstance(key.curve, ec.SECP384R1)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=5 * 365) <= lifetime <= dt.timedelta(days=5 * 366)
    cert.verify_directly_issued_by(cert)  # self-signed


def test_server_cert_chain_and_sans(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca_cert, ca_key = ca
    cert, key = issue_server_cert(
        ca_cert, ca_key, "10.0.0.5", ips=["10.0.0.6"], dns=["coord.example"]
    )
    verify_issued_by(cert, ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.0.5", "10.0.0.6")
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    # A host name goes in as DNS, and is not duplicated.
    named, _ = issue_server_cert(ca_cert, ca_key, "localhost")
    san2 = named.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san2.get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(InvalidConfigError, match="does not appear to be an IPv4 or IPv6 address"):
        issue_server_cert(ca_cert, ca_key, "127.0.0.1", ips=["coord.example"])


def test_certificate_from_another_ca_is_refused(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    other_ca, other_key = create_ca("other")
    cert, _ = issue_client_cert(other_ca, other_key, "mallory", role=Role.ADMIN)
    with pytest.raises(InvalidConfigError, match="was not issued by CA"):
        verify_issued_by(cert, ca[0])
    leaf, _ = issue_client_cert(ca[0], ca[1], "x", role=Role.GUEST)
    with pytest.raises(InvalidConfigError, match="not a CA certificate"):
        verify_issued_by(leaf, leaf)
    late = dt.datetime.now(dt.UTC) + dt.timedelta(days=3 * 365)
    with pytest.raises(InvalidConfigError, match="valid only from"):
        verify_issued_by(leaf, ca[0], at=late)


@pytest.mark.parametrize(
    ("role", "level"), [("admin", 4), ("engineer", 3), ("auditor", 2), ("guest", 1)]
)
def test_role_round_trip(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], role: str, level: int
) -> None:
    cert, _ = issue_client_cert(ca[0], ca[1], "alice", role=Role(role))
    verify_issued_by(cert, ca[0])
    assert role_from_certificate(cert) is Role(role)
    assert Role(role).level == level
    assert (
        cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
        == f"role:{role}"
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not is_hospital_certificate(cert)


def test_role_order_and_parse() -> None:
    assert [r.level for r in Role] == [4, 3, 2, 1]
    assert Role.ADMIN.allows(Role.AUDITOR) and Role.AUDITOR.allows(Role.AUDITOR)
    assert not Role.GUEST.allows(Role.AUDITOR)
    with pytest.raises(InvalidConfigError, match="unknown operator role 'root'"):
        Role.parse("root")


def _forged(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *units: str
) -> x509.Certificate:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, "eve"))
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA384())
    )


def test_missing_unknown_or_double_role_refused(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    hospital, _ = issue_client_cert(ca[0], ca[1], "hospital-a", hospital=True)
    assert is_hospital_certificate(hospital)
    with pytest.raises(InvalidConfigError, match="carries no operator role"):
        role_from_certificate(hospital)
    with pytest.raises(InvalidConfigError, match="unknown role 'root'"):
        role_from_certificate(_forged(ca, "role:root"))
    with pytest.raises(InvalidConfigError, match="several roles"):
        role_from_certificate(_forged(ca, "role:guest", "role:admin"))
    with pytest.raises(InvalidConfigError, match="exactly one of role"):
        issue_client_cert(ca[0], ca[1], "x", role=Role.ADMIN, hospital=True)
    with pytest.raises(InvalidConfigError, match="exactly one of role"):
        issue_client_cert(ca[0], ca[1], "x")


def test_node_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    # The exact functions flower-supernode and `flwr supernode register` call.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    pair = generate_node_keypair(comment="hospital-a@test")
    assert isinstance(pair, NodeKeyPair)
    assert pair.private_openssh.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pair.public_openssh.startswith(b"ecdsa-sha2-nistp384 ")
    assert pair.public_openssh.endswith(b" hospital-a@test\n")
    (tmp_path / "node.key").write_bytes(pair.private_openssh)
    (tmp_path / "node.pub").write_bytes(pair.public_openssh)

    loaded = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(tmp_path / "node.key"), auth_supernode_public_key=None
        )
    )
    assert loaded is not None
    private, public = loaded
    assert isinstance(private.curve, ec.SECP384R1)
    registered = try_load_public_key(tmp_path / "node.pub")  # bytes Flower stores
    assert registered == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Two pairs are different keys (Flower refuses a key registered twice).
    assert generate_node_keypair().public_openssh != generate_node_keypair().public_openssh
    with pytest.raises(InvalidConfigError, match="whitespace"):
        generate_node_keypair(comment="two words")


def test_x25519_pem_round_trip() -> None:
    private, public = generate_x25519_keypair()
    assert isinstance(private, x25519.X25519PrivateKey)
    again = load_x25519_private_pem(private_key_to_pem(private))
    pub = load_x25519_public_pem(public_key_to_pem(public))
    peer, peer_pub = generate_x25519_keypair()
    assert again.exchange(peer_pub) == peer.exchange(pub) == private.exchange(peer_pub)
    with pytest.raises(InvalidConfigError, match="not a PEM X25519 public key"):
        load_x25519_public_pem(
            public_key_to_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
        )


def test_write_secret_is_0600_from_the_start(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        path = write_secret(tmp_path / "a" / "b" / "k.key", b"secret")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    # An existing file with a loose mode is tightened and truncated.
    loose = tmp_path / "loose.key"
    loose.write_bytes(b"old contents, longer")
    loose.chmod(0o644)
    write_secret(loose, b"new")
    assert loose.read_bytes() == b"new"
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
