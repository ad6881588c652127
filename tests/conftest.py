"""How ``make test TEST_WORKERS=2`` spreads the suite over pytest-xdist workers.

The integration scenarios are real consortia that mostly wait (Flower's polling,
round timeouts, a ClientApp process per message: about a third of one core each),
so ``-n 2 --dist loadfile`` runs two at once. Each test file is one unit of work, kept
on one worker, so a module's fixture (often a whole consortium) is built once.
Two groups of files share a unit:

* the modules that inspect the session's ``fedvault demo`` run, so it runs once;
* every module that starts Ray: ``ray.init()`` with no address joins the latest
  Ray instance it finds on the machine, so a second simulation at the same time
  could join the first one's cluster instead of starting its own.

Under xdist the longest units are collected first, so that they start first
(with ``--no-loadscope-reorder`` xdist hands units out in collection order).
Without xdist (``make test``, serial) nothing changes.

Not the default: on two cores a fault scenario running beside a Ray simulation
missed its 45 s round timeout in a clean-clone run (the simulation keeps both
cores busy), so CI runs serially.

(xdist's own ``xdist_group`` marks do not work with pytest 9.2: xdist renames
each test's ``_nodeid``, which pytest 9.2 no longer reads.)
"""

from __future__ import annotations

from typing import Any

import pytest

_DEMO = "tests/integration/demo-session"
_RAY = "tests/starts-ray"
_SHARED_UNITS = {
    "tests/integration/test_deployment.py": _DEMO,
    "tests/integration/test_dashboard_browser.py": _DEMO,
    "tests/integration/test_ray_cluster.py": _RAY,
    "tests/integration/test_resume.py": _RAY,
    "tests/test_simulation_e2e.py": _RAY,
    "tests/coordinator/test_tracking.py": _RAY,
    "tests/test_bench_smoke.py": _RAY,
    "tests/test_cli.py": _RAY,
    "tests/test_cli_errors.py": _RAY,
}
# Longest first (seconds, serial run on the 2-core box, 2026-12-06); the rest follow
# in their usual order.
_LONGEST_FIRST = (
    _RAY,  # ~260 s
    "tests/integration/test_client_faults.py",  # ~230 s
    _DEMO,  # ~150 s
    "tests/integration/test_masked_dropout.py",  # ~135 s
    "tests/integration/test_service_jobs.py",  # ~115 s
    "tests/integration/test_task_package.py",  # ~85 s
    "tests/integration/test_flower_processes.py",  # ~65 s
)


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the group its file shares."""
    path = nodeid.split("::", 1)[0]
    return _SHARED_UNITS.get(path, path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: the usual order

    def rank(item: pytest.Item) -> int:
        unit = unit_of(item.nodeid)
        return _LONGEST_FIRST.index(unit) if unit in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None  # another distribution was asked for: xdist's own
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return UnitScheduling(config, log)
