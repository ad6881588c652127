"""The node config the hospital daemon starts its SuperNode with, read back by the
ClientApp (``KitSites``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedvault.client.node_settings import NODE_CONFIG_KEYS, NodeSettings
from fedvault.errors import InvalidConfigError
from fedvault.flower_env import ConfigValue, toml_table

FULL = NodeSettings(
    kit=Path("/srv/kit"),
    data=Path("/srv/data/data.toml"),
    state_dir=Path("/srv/state"),
    policy=Path("/srv/policy.toml"),
    device="cuda:1",
    max_physical_batch=32,
    epsilon_budget=2.5,
)


def _context(node_config: dict[str, ConfigValue]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_settings_round_trip_through_a_flower_context() -> None:
    config = FULL.to_flower()
    assert list(config) == [
        "kit",
        "data",
        "state-dir",
        "policy",
        "device",
        "max-physical-batch",
        "epsilon-budget",
    ]
    assert (config["max-physical-batch"], config["epsilon-budget"]) == (32, 2.5)
    toml_table(config)  # the SuperNode's --node-config file accepts every value
    assert NodeSettings.from_context(_context(config)) == FULL
    bare = NodeSettings(kit=Path("k"), data=Path("d"), state_dir=Path("s"))
    assert bare.to_flower() == {"kit": "k", "data": "d", "state-dir": "s", "device": "auto"}
    assert NodeSettings.from_context(_context(bare.to_flower())) == bare
    assert bare.policy_path == Path("s") / "policy.toml"  # the default policy file


def test_values_read_as_before() -> None:
    required: dict[str, ConfigValue] = {"kit": "k", "data": "d", "state-dir": "s"}
    as_strings = NodeSettings.from_flower(
        {**required, "epsilon-budget": "1.5", "max-physical-batch": "8", "policy": ""}
    )
    assert (as_strings.epsilon_budget, as_strings.max_physical_batch) == (1.5, 8)
    assert as_strings.policy is None  # empty: the default file
    zero = NodeSettings.from_flower({**required, "epsilon-budget": 0.0})
    assert zero.epsilon_budget is None  # 0 meant "not set", as it did


def test_a_missing_key_names_it_and_the_command() -> None:
    with pytest.raises(InvalidConfigError, match=r"lacks \['data', 'state-dir'\].*client start"):
        NodeSettings.from_context(_context({"kit": "k", "data": ""}))
    assert NODE_CONFIG_KEYS == ("kit", "data", "state-dir")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("kit", 5, r"node config kit must be a string \(got 5, int\)"),
        ("device", 0, "node config device must be a string"),
        ("epsilon-budget", "lots", "node config epsilon-budget must be a number"),
        ("epsilon-budget", True, "node config epsilon-budget must be a number"),
        ("max-physical-batch", 2.5, "max-physical-batch must be a whole number"),
    ],
)
def test_a_mistyped_value_is_refused(key: str, value: ConfigValue, match: str) -> None:
    config: dict[str, ConfigValue] = {"kit": "k", "data": "d", "state-dir": "s", key: value}
    with pytest.raises(InvalidConfigError, match=match):
        NodeSettings.from_flower(config)


def test_kit_sites_identify_the_hospital_from_the_node_config(tmp_path: Path) -> None:
    from fedvault.app.provision import provision
    from fedvault.client.kit_sites import KitSites

    example = Path(__file__).resolve().parents[2] / "examples" / "consortium.toml"
    kits = provision(example, tmp_path / "kits").hospital_kits
    name, kit_dir = next(iter(sorted(kits.items())))
    node = NodeSettings(kit=kit_dir, data=tmp_path / "data.toml", state_dir=tmp_path / "state")
    who = KitSites().identity(_context(node.to_flower()))
    assert who.name == name and who.kit is not None and who.kit.party == name
