"""Processes that never train stay light: no torch, Opacus or TenSEAL in them.

The coordinator daemon supervises; in the 100-hospital soak it held 696 MB of
RSS while it imported the ServerApp's training stack for one constant and an
example's model and data for its training defaults. The CLI's entry point and
the job configuration are imported by every command, including ``fedvault
status`` on an operator's laptop.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "opacus", "tenseal")


def _heavy_modules_after(code: str, *args: str) -> str:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "module", ["fedvault.coordinator.daemon", "fedvault.app.cli", "fedvault.config"]
)
def test_module_does_not_import_the_training_stack(module: str) -> None:
    assert _heavy_modules_after(f"import {module}") == "[]"


@pytest.mark.parametrize("example", ["breast-cancer", "digits"])
def test_the_daemon_reads_a_job_file_without_the_training_stack(
    example: str, tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "j"\nexample = "{example}"\nhospitals = 3\nrounds = 2\n')
    code = (
        "from pathlib import Path\n"
        "from fedvault.coordinator.daemon import load_job_file\n"
        "print(load_job_file(Path(sys.argv[1])).training)"
    )
    assert _heavy_modules_after(code, str(job)) == "[]"
    # The control: the example itself (model and data) does bring torch in.
    assert "torch" in _heavy_modules_after(
        f"from fedvault.examples import get_example\nget_example({example!r})"
    )


def test_the_client_app_imports_torch_only_to_train() -> None:
    # Flower starts one ClientApp process per message: the unmask query and the key
    # ceremony's messages must not pay torch's (and Opacus') import, about 1 s of CPU
    # each on this machine. TenSEAL is needed for the ceremony's keys.
    loaded = _heavy_modules_after("import fedvault.client.client_app")
    assert "torch" not in loaded and "opacus" not in loaded, loaded
