"""Why a hospital's SuperNode exited, and how soon it is started again."""

from __future__ import annotations

from pathlib import Path

from fedvault.client.supernode import _exit_reason

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
