"""The ServerApp's reply polling: quick for a small consortium, bounded for a large one."""

from __future__ import annotations

import pytest

from fedvault.coordinator import server_app


@pytest.mark.parametrize("outstanding", [1, 3, 4, 5, 16, 17, 100, 1000])
def test_poll_cap_keeps_pull_requests_per_second_bounded(outstanding: int) -> None:
    cap = server_app._poll_cap(outstanding)
    pulls = -(-outstanding // server_app._PULL_BATCH)  # one request per batch of replies
    assert 0 < cap <= server_app._POLL_S
    # Never more pull requests a second than the pause allows, nor than before (1 poll/s).
    assert pulls / cap <= max(server_app._PULLS_PER_S, pulls / server_app._POLL_S) + 1e-9


def test_a_small_consortium_waits_at_most_a_quarter_second_between_polls() -> None:
    assert server_app._poll_cap(3) == pytest.approx(0.25)
    assert server_app._poll_cap(100) == server_app._POLL_S


@pytest.mark.parametrize("outstanding", [1, 100, 200, 201, 1000, 5000])
def test_a_simulation_checks_a_bounded_number_of_ids_a_second(outstanding: int) -> None:
    """Flower's in-memory pull checks every id asked for: spaced out, never more per second."""
    interval = 0.1  # Flower's default pull_interval
    pause = server_app._in_memory_pause(interval, outstanding)
    assert pause >= interval  # never faster than Flower's own loop
    assert outstanding / pause <= server_app._IN_MEMORY_IDS_PER_PULL / interval + 1e-9
    if outstanding <= server_app._IN_MEMORY_IDS_PER_PULL:
        assert pause == interval  # the round's last replies wait no longer than in Flower
