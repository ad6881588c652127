"""One log line per round event: started, committed (participants, seconds), failed (reason).

The ServerApp logs them as they happen (:func:`round_started`,
:func:`round_committed`, :func:`round_failed`), but in a deployment Flower
captures the ServerApp's output; the coordinator daemon's own log gets the same
lines from :class:`RoundEventFollower`, which reads what the ServerApp recorded
in the round store each time the daemon polls its run. Committed and failed
lines carry the store's true times; the follower's ``started`` line is written
when it sees the round under way (its previous round ended), within one poll.

Every line carries ``job`` and ``round`` as record attributes, so the text
formatter writes ``job=J round=N`` and the JSON one has them as keys
(:mod:`fedvault.logs`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from fedvault.coordinator.records import RoundView
from fedvault.coordinator.store import RoundStore
from fedvault.errors import StoreError

__all__ = ["RoundEventFollower", "round_committed", "round_failed", "round_started"]

log = logging.getLogger("fedvault.coordinator")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def round_started(job: str, number: int, attempt: int = 1) -> None:
    """Round ``number`` (attempt ``attempt``) of ``job`` started."""
    again = f" (attempt {attempt})" if attempt > 1 else ""
    log.info("started%s", again, extra={"job": job, "round": number})


def round_committed(job: str, view: RoundView) -> None:
    """Round ``view.number`` was committed: its participants and how long it took."""
    seconds = _seconds(view.started_at, view.committed_at)
    took = "" if seconds is None else f" in {seconds:.1f} s"
    n = view.num_participants
    log.info(
        "committed: %d participant%s%s",
        n,
        "" if n == 1 else "s",
        took,
        extra={"job": job, "round": view.number},
    )


def round_failed(job: str, number: int, attempt: int, reason: str) -> None:
    """Attempt ``attempt`` at round ``number`` failed for ``reason``.

    INFO, like the other round events: the round is retried or the job fails,
    which is logged on its own; and a simulation, which configures no logging,
    prints nothing (Python's last-resort handler writes WARNING and above).
    """
    log.info("attempt %d failed: %s", attempt, reason, extra={"job": job, "round": number})


class RoundEventFollower:
    """Logs the round events of job ``job`` recorded in the store since it was created.

    Call :meth:`poll` as often as convenient (the daemon does on every run-status
    poll); each committed round and failed attempt is logged once, and the next
    round's ``started`` line once.
    """

    def __init__(self, store_url: str, job: str) -> None:
        self.store_url, self.job = store_url, job
        self._seen: set[tuple[int, int]] | None = None  # (round, attempt) already logged
        self._after = 0  # rounds up to here are committed and logged
        self._started: tuple[int, int] | None = None  # the (round, attempt) announced

    def poll(self) -> None:
        """Log what happened since the last poll (the first poll only takes stock).

        A store that cannot be read right now is logged, not raised: these lines
        are for people, and the next poll catches up.
        """
        try:
            with RoundStore(self.store_url) as store:
                row = store.get_job(self.job)
                if row is None:
                    return
                views = store.rounds(row.id, after=self._after)
        except StoreError as exc:
            log.warning("cannot read the rounds of job %s for the log: %s", self.job, exc)
            return
        first = self._seen is None
        seen = self._seen if self._seen is not None else set()
        for view in views:
            key = (view.number, view.attempt)
            if key in seen:
                continue
            seen.add(key)
            if first:
                continue  # recorded before this follower started: logged by then
            if view.status == "committed":
                round_committed(self.job, view)
            else:
                round_failed(self.job, view.number, view.attempt, view.reason)
        committed = [v.number for v in views if v.status == "committed"]
        self._after = max([self._after, *committed])
        self._seen = {k for k in seen if k[0] > self._after}  # older ones are not read again
        planned = row.config.get("rounds")
        number = self._after + 1
        if row.status != "running" or (isinstance(planned, int) and number > planned):
            return
        attempt = 1 + sum(v.number == number and v.status == "failed" for v in views)
        if self._started != (number, attempt):
            self._started = (number, attempt)
            round_started(self.job, number, attempt)
