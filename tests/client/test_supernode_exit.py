"""Why a hospital's SuperNode exited, and how soon it is started again."""

from __future__ import annotations

from pathlib import Path

from fedvault.client.supernode import _exit_reason
from fedvault.client.supernode_entry import CONNECTION_ENDED_TEXT

# What flower-supernode 1.41 logs when ActivateNode fails, in both cases.
_PREFIX = (
    "Failed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Attempted to register SuperNode with public key: b'...', exception: "
)
STILL_ONLINE = _PREFIX + "SuperNode with node ID 42 could not be activated.\n"
NOT_ENROLLED = _PREFIX + "No SuperNode found with the given public key.\n"


def _reason(tmp_path: Path, text: str) -> str:
    log = tmp_path / "supernode.log"
    log.write_text("--- fedvault marker ---\n" + text)
    return _exit_reason(log, 0)


def test_a_restart_before_the_old_session_expired_is_not_called_unenrolled(
    tmp_path: Path,
) -> None:
    reason = _reason(tmp_path, STILL_ONLINE)
    assert reason.startswith("[code: 2004]")
    assert "could not be activated" in reason and "previous session" in reason
    assert "not registered" not in reason


def test_an_unknown_key_is_still_reported_as_unenrolled(tmp_path: Path) -> None:
    reason = _reason(tmp_path, NOT_ENROLLED)
    assert reason.startswith("[code: 2004]") and "not registered" in reason
    assert "could not be activated" not in reason


def test_a_refused_activation_names_both_causes(tmp_path: Path) -> None:
    # What flower-supernode 1.41 really logs (the detail stays in the SuperLink's log).
    text = (
        "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
        "[code: 2004] Failed to activate SuperNode.\n"
    )
    reason = _reason(tmp_path, text)
    assert reason.startswith("[code: 2004]")
    assert "not registered" in reason and "still counts as online" in reason


def test_a_taken_runtime_port_is_named(tmp_path: Path) -> None:
    text = (
        "ERROR:    [Errno 98] error while attempting to bind on address "
        "('127.0.0.1', 39387): address already in use\n"
        "RuntimeError: SuperNode Runtime HTTP API failed to start.\n"
    )
    reason = _reason(tmp_path, text)
    assert "port 39387" in reason and "another process holds it" in reason


def test_an_ended_fleet_loop_is_reported_with_its_cause(tmp_path: Path) -> None:
    text = (
        "ERROR :     Server error '500 Internal Server Error' for url "
        "'https://127.0.0.1:1/v1/fleet/pull-messages'\n"
        f"fedvault: {CONNECTION_ENDED_TEXT} (the error above); exiting with code 75\n"
    )
    reason = _reason(tmp_path, text)
    assert reason.startswith(CONNECTION_ENDED_TEXT) and "500 Internal Server Error" in reason
