"""The coordinator never ships code to hospitals: every party runs the task it installed.

Flower can install a submitted app's dependencies at run time (``uv sync``);
fedvault turns that off on the SuperLink and never turns it on at a SuperNode,
so a job can name a task but never bring one. The task fingerprint
(tests/test_fingerprint.py) then proves every party installed the same one.
"""

from __future__ import annotations

from pathlib import Path

from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
from fedvault.coordinator.superlink import SuperLinkConfig, SuperLinkProcess


def test_the_superlink_refuses_runtime_dependency_installation(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    link = SuperLinkProcess(
        SuperLinkConfig(state_dir=tmp_path, ca_certfile=pem, certfile=pem, keyfile=pem)
    )
    assert "--disable-runtime-dependency-installation" in link.superlink_argv()


def test_a_supernode_never_allows_it(tmp_path: Path) -> None:
    node = SuperNodeSupervisor(
        SuperNodeConfig(
            superlink="127.0.0.1:9092",
            root_certificates=tmp_path / "ca.pem",
            private_key=tmp_path / "node.key",
            state_dir=tmp_path,
            runtime_port=9094,
            node_config={"kit": "k", "data": "d", "state-dir": "s"},
        )
    )
    assert not any("dependency-installation" in a for a in node.argv())
