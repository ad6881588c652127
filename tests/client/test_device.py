"""Which device a hospital trains on (``fedvault client start --device``)."""

from __future__ import annotations

import pytest
import torch

from fedvault.client.training import pick_device
from fedvault.errors import InvalidConfigError


def test_auto_takes_a_gpu_when_there_is_one() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected == pick_device("AUTO").type
    assert pick_device("cpu") == torch.device("cpu")


def test_a_gpu_this_machine_lacks_is_refused_with_what_it_has() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InvalidConfigError, match=r"cuda:\d+' was asked for but this machine"):
        pick_device(f"cuda:{count}")
    with pytest.raises(InvalidConfigError, match="not one of auto, cpu, cuda, cuda:N"):
        pick_device("tpu")
