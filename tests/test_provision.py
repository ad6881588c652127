"""`fedvault provision`: kits, key custody, manifests and their verification."""

from __future__ import annotations

import shutil
import ssl
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fedvault.app.provision import ProvisionResult, load_consortium, parse_consortium, provision
from fedvault.errors import InvalidConfigError
from fedvault.kit import Kit, KitError, KitKind
from fedvault.privacy.pki import Role, role_from_certificate
from fedvault.privacy.sealing import seal_context_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "consortium.toml"
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
OPERATORS = {"alice": Role.ADMIN, "bob": Role.ENGINEER, "carol": Role.AUDITOR, "dave": Role.GUEST}
PRIVATE_MARKERS = (b"PRIVATE KEY-----",)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> ProvisionResult:
    return provision(EXAMPLE, tmp_path_factory.mktemp("prov") / "out")


@pytest.fixture
def copy(result: ProvisionResult, tmp_path: Path) -> Path:
    """A private copy of the whole output, safe to tamper with."""
    dst = tmp_path / "out"
    shutil.copytree(result.out_dir, dst)
    return dst


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_example_parses() -> None:
    c = load_consortium(EXAMPLE)
    assert c.name == "northwind-oncology"
    assert (str(c.coordinator), str(c.operator_api)) == ("127.0.0.1:9092", "127.0.0.1:9093")
    assert list(c.hospitals) == HOSPITALS and c.custodian == "hospital-a"
    assert {o.name: o.role for o in c.operators} == OPERATORS


def test_layout(result: ProvisionResult) -> None:
    out = result.out_dir
    assert {p.relative_to(out).as_posix() for p in _files(out / "ca")} == {"ca/ca.pem", "ca/ca.key"}
    coord = {p.relative_to(out / "coordinator").as_posix() for p in _files(out / "coordinator")}
    assert coord == {
        "ca.pem",
        "coordinator.pem",
        "coordinator.key",
        "at-rest.key",
        "manifest.json",
        "manifest.sig",
        *(f"nodes/{h}.pub" for h in HOSPITALS),
        *(f"seal/{h}.pub" for h in HOSPITALS),
    }
    for h in HOSPITALS:
        kit = out / "hospitals" / h
        assert {p.relative_to(kit).as_posix() for p in _files(kit)} == {
            "ca.pem",
            "node.key",
            "node.pub",
            "seal.key",
            "seal.pub",
            "hospital.pem",
            "hospital.key",
            "manifest.json",
            "manifest.sig",
            *(f"peers/{p}.seal.pub" for p in HOSPITALS),
        }
    for o in OPERATORS:
        kit = out / "operators" / o
        assert {p.name for p in _files(kit)} == {
            "ca.pem",
            "operator.pem",
            "operator.key",
            "manifest.json",
            "manifest.sig",
        }
    assert len(result.ca_sha256) == 64
    # No HE key anywhere: the provisioner never generates one.
    assert not [p for p in _files(out) if "ckks" in p.name or "context" in p.name]


def test_private_keys_are_0600_and_each_in_exactly_one_place(result: ProvisionResult) -> None:
    files = _files(result.out_dir)
    contents = {p: p.read_bytes() for p in files}
    private = [
        p
        for p, data in contents.items()
        if any(m in data for m in PRIVATE_MARKERS) or p.name == "at-rest.key"  # raw bytes
    ]
    # ca + coordinator (TLS, at rest) + 3 x (node, seal, hospital) + 4 operators
    assert len(private) == 1 + 2 + 3 * 3 + 4
    for p in private:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert p.suffix == ".key", p
    for p in files:
        if p not in private:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # certificates, public keys
    for d in [result.out_dir, *(p for p in result.out_dir.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for p in private:
        holders = [q for q, data in contents.items() if contents[p] in data]
        assert holders == [p], f"{p} also appears in {holders}"
    # All 16 keys are distinct.
    assert len({contents[p] for p in private}) == len(private)
    # The coordinator holds exactly two secrets: its TLS key and the store's at-rest key.
    coord_private = [p for p in private if result.coordinator_kit in p.parents]
    assert coord_private == [
        result.coordinator_kit / "at-rest.key",
        result.coordinator_kit / "coordinator.key",
    ]


def test_at_rest_key_is_the_coordinators_secret(result: ProvisionResult, tmp_path: Path) -> None:
    coord = Kit.load(result.coordinator_kit, expected_kind=KitKind.COORDINATOR)
    key = coord.at_rest_key()
    assert len(key) == 32 and key == (result.coordinator_kit / "at-rest.key").read_bytes()
    assert coord.manifest.files["at-rest.key"].secret is True
    # 32 random bytes: a fresh consortium gets another key (2**-256 to collide).
    other = Kit.load(provision(EXAMPLE, tmp_path / "other").coordinator_kit)
    assert other.at_rest_key() != key
    for kit in (result.hospital_kits["hospital-a"], result.operator_kits["alice"]):
        with pytest.raises(KitError, match=r"has no at-rest.key: only a coordinator kit"):
            Kit.load(kit).at_rest_key()


def test_hospital_and_coordinator_public_keys_match(result: ProvisionResult) -> None:
    coord = Kit.load(result.coordinator_kit, expected_kind=KitKind.COORDINATOR)
    enrolled = coord.seal_public_keys()
    raw = serialization.PublicFormat.Raw
    for h in HOSPITALS:
        kit = Kit.load(result.hospital_kits[h], expected_kind=KitKind.HOSPITAL)
        own = kit.seal_private_key().public_key().public_bytes(serialization.Encoding.Raw, raw)
        assert enrolled[h].public_bytes(serialization.Encoding.Raw, raw) == own
        assert coord.node_public_key_paths()[h].read_bytes() == kit.node_pub_path.read_bytes()
        node_priv = serialization.load_ssh_private_key(kit.node_key_path.read_bytes(), None)
        node_pub = serialization.load_ssh_public_key(kit.node_pub_path.read_bytes())
        assert node_priv.public_key().public_numbers() == node_pub.public_numbers()  # type: ignore[union-attr]
        assert kit.is_custodian == (h == "hospital-a")
        assert kit.coordinator_address == "127.0.0.1:9092"


def test_key_ceremony_through_the_kits(result: ProvisionResult) -> None:
    custodian = Kit.load(result.hospital_kits["hospital-a"])
    envs = seal_context_for(
        custodian.seal_public_keys(),
        b"SECRET-HE-CONTEXT",
        consortium=custodian.consortium,
        epoch=1,
        sender=custodian.party,
        signing_key=custodian.private_key(),
    )
    assert sorted(envs) == ["hospital-b", "hospital-c"]
    for h, env in envs.items():
        kit = Kit.load(result.hospital_kits[h])
        env.verify_sender(custodian.certificate(), kit.ca_cert)
        assert env.open(kit.seal_private_key(), expected_epoch=1) == b"SECRET-HE-CONTEXT"


def test_operator_kits_carry_their_role(result: ProvisionResult) -> None:
    for name, role in OPERATORS.items():
        kit = Kit.load(result.operator_kits[name], expected_kind=KitKind.OPERATOR)
        assert kit.role is role and kit.manifest.role is role
        assert role_from_certificate(kit.certificate()) is role
        assert kit.operator_api_address == "127.0.0.1:9093"


def test_tls_handshake_with_provisioned_certificates(result: ProvisionResult) -> None:
    """Mutual TLS in memory: server cert valid for 127.0.0.1, operator cert accepted."""
    coord = Kit.load(result.coordinator_kit)
    op = Kit.load(result.operator_kits["carol"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(coord.cert_path, coord.key_path)
    server.load_verify_locations(coord.ca_path)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(op.ca_path))
    client.load_cert_chain(op.cert_path, op.key_path)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    for _ in range(10):
        done = 0
        for conn, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                conn.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            break
    assert done == 2
    peer = s.getpeercert()
    assert dict(x[0] for x in peer["subject"])["organizationalUnitName"] == "role:auditor"


@pytest.mark.parametrize(
    ("kit", "name"),
    [
        ("hospitals/hospital-b", "node.pub"),
        ("hospitals/hospital-b", "peers/hospital-a.seal.pub"),
        ("hospitals/hospital-b", "seal.key"),
        ("coordinator", "nodes/hospital-c.pub"),
        ("coordinator", "at-rest.key"),
        ("operators/bob", "operator.pem"),
    ],
)
def test_tampered_file_refused(copy: Path, kit: str, name: str) -> None:
    path = copy / kit / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(KitError, match=rf"failed verification: {name} was modified; re-provision"):
        Kit.load(copy / kit)


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig", "ca.pem"])
def test_tampered_manifest_signature_or_ca_refused(copy: Path, name: str) -> None:
    path = copy / "hospitals" / "hospital-a" / name
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(KitError, match=r"manifest.json was modified .*signature"):
        Kit.load(path.parent)


def test_missing_file_and_wrong_kind_refused(copy: Path) -> None:
    (copy / "coordinator" / "seal" / "hospital-b.pub").unlink()
    with pytest.raises(KitError, match=r"seal/hospital-b.pub is missing"):
        Kit.load(copy / "coordinator")
    (copy / "operators" / "dave" / "manifest.sig").unlink()
    with pytest.raises(KitError, match=r"manifest.sig is missing"):
        Kit.load(copy / "operators" / "dave")
    with pytest.raises(KitError, match="operator kit of 'alice', not a hospital kit"):
        Kit.load(copy / "operators" / "alice", expected_kind=KitKind.HOSPITAL)
    with pytest.raises(KitError, match="not the pinned CA"):
        Kit.load(copy / "operators" / "alice", expected_ca_sha256="00" * 32)
    with pytest.raises(KitError, match=r"has no node.key"):
        _ = Kit.load(copy / "operators" / "alice").node_key_path


def test_kit_from_another_consortium_swapped_in_refused(copy: Path, tmp_path: Path) -> None:
    other = provision(EXAMPLE, tmp_path / "other")
    shutil.copy(
        other.hospital_kits["hospital-b"] / "node.key", copy / "hospitals/hospital-b/node.key"
    )
    with pytest.raises(KitError, match=r"node.key was modified"):
        Kit.load(copy / "hospitals" / "hospital-b")
    # Pinning the CA catches a whole kit replaced by another consortium's.
    good = Kit.load(copy / "hospitals" / "hospital-a").manifest.ca_sha256
    with pytest.raises(KitError, match="pinned CA"):
        Kit.load(other.hospital_kits["hospital-a"], expected_ca_sha256=good)


@pytest.mark.parametrize("name", ["hospitals/hospital-c/seal.key", "coordinator/at-rest.key"])
def test_loose_private_key_mode_refused(copy: Path, name: str) -> None:
    key = copy / name
    key.chmod(0o640)
    with pytest.raises(KitError, match=r"readable by group/others \(mode 0640\); run `chmod 600 "):
        Kit.load(key.parent)
    key.chmod(0o600)
    Kit.load(key.parent)


def test_non_empty_out_dir_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InvalidConfigError, match="refusing to overwrite"):
        provision(EXAMPLE, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Kit.load(provision(EXAMPLE, empty).coordinator_kit).party == "coordinator"


BASE = {
    "consortium": {
        "name": "c",
        "coordinator": "127.0.0.1:9092",
        "operator_api": "127.0.0.1:9093",
        "custodian": "a",
    },
    "hospitals": [{"name": "a"}, {"name": "b"}],
    "operators": [{"name": "o", "role": "admin"}],
}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"custodian": "z"}, "custodian = 'z' is not one of the hospitals"),
        ({"coordinator": "127.0.0.1"}, "is not 'host:port'"),
        ({"coordinator": "127.0.0.1:70000"}, "port must be in 1..65535"),
        ({"coordinator": "0.0.0.0:9092"}, "bind-all address"),
        ({"coordinator": "bad_host!:9092"}, "not 'host:port'|not an IP or host name"),
        ({"operator_api": "127.0.0.1:9092"}, "its own port"),
        ({"name": "two words"}, "not a valid name"),
        ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_invalid_consortium_section(patch: dict[str, object], message: str) -> None:
    data = {**BASE, "consortium": {**BASE["consortium"], **patch}}  # type: ignore[dict-item]
    with pytest.raises(InvalidConfigError, match=message):
        parse_consortium(data)


@pytest.mark.parametrize(
    ("hospitals", "operators", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], [], "duplicate name 'a'"),
        ([{"name": "a"}], [{"name": "A", "role": "guest"}], "duplicate name 'A'"),
        ([{"name": "a"}], [{"name": "o", "role": "root"}], "unknown operator role 'root'"),
        ([{"name": "a"}], [{"name": "o"}], "needs role"),
        ([{"name": "a"}, {"name": "coordinator"}], [], "reserved"),
        ([], [], "at least one"),
    ],
)
def test_invalid_parties(hospitals: list[object], operators: list[object], message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        parse_consortium({**BASE, "hospitals": hospitals, "operators": operators})


def test_ipv6_and_dns_addresses(tmp_path: Path) -> None:
    c = parse_consortium(
        {
            **BASE,
            "consortium": {
                **BASE["consortium"],
                "coordinator": "[::1]:9092",  # type: ignore[dict-item]
                "operator_api": "ops.example.org:443",
            },
        }
    )
    assert (c.coordinator.host, c.coordinator.port, str(c.coordinator)) == (
        "::1",
        9092,
        "[::1]:9092",
    )
    assert str(c.operator_api) == "ops.example.org:443"
    bad = tmp_path / "bad.toml"
    bad.write_text("[consortium\n")
    with pytest.raises(InvalidConfigError, match="not valid TOML"):
        load_consortium(bad)
    with pytest.raises(InvalidConfigError, match="does not exist"):
        load_consortium(tmp_path / "nope.toml")
