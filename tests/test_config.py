"""One source of truth for configuration: RunConfig, pyproject's table, node configs, overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

import shared.config_table as config_table
from shared.config import ConfigError, RunConfig, parse_override
from shared.node_config import NodeConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _flower_table() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_table_is_generated_from_run_config():
    """Any drift (a key, a default, a comment) between RunConfig and pyproject fails here;
    `python -m shared.config_table --write` regenerates the table."""
    assert config_table.current_table() == config_table.render_table()
    table = _flower_table()
    assert list(table) == [field.alias for field in RunConfig.model_fields.values()]
    assert RunConfig.from_flower(table) == RunConfig()
    assert config_table.main(["--check"]) == 0


def test_the_drift_check_catches_a_changed_default_and_a_changed_comment(tmp_path):
    text = PYPROJECT.read_text()
    for edit in (("num-rounds = 10", "num-rounds = 11"), ("# federated training rounds", "# rounds")):
        drifted = tmp_path / "pyproject.toml"
        drifted.write_text(text.replace(*edit, 1))
        assert config_table.current_table(drifted) != config_table.render_table()
        assert config_table.write_table(drifted) and config_table.current_table(drifted) == config_table.render_table()
        assert drifted.read_text() == text  # rewriting restores exactly the generated table


def test_every_field_has_a_description_for_its_comment():
    assert all(field.description for field in RunConfig.model_fields.values())


def test_run_config_errors_name_the_key_and_the_source():
    with pytest.raises(ConfigError, match=r"invalid configuration in here:\n  field 'num-rounds': Input should be greater"):
        RunConfig.from_flower({"num-rounds": 0}, source="here")
    with pytest.raises(ConfigError, match="field 'factorz': Extra inputs are not permitted"):
        RunConfig.from_flower({"factorz": 3})
    with pytest.raises(ConfigError, match="needs mf-solver 'sgd'"):
        RunConfig.from_flower({"privacy": "client"})
    with pytest.raises(ConfigError, match="carry-evaluation adds the evaluation to a training message"):
        RunConfig.from_flower({"carry-evaluation": True, "secure-aggregation": True})
    with pytest.raises(ConfigError, match="with fraction-train < 1 the others would go unevaluated"):
        RunConfig.from_flower({"carry-evaluation": True, "fraction-train": 0.5})


def test_evaluation_is_carried_by_default_wherever_it_can_be() -> None:
    """carry-evaluation = "auto" (the default): one exchange a round unless a training round
    leaves merchants out or is secure aggregation's protocol; true or false decide alone."""
    assert RunConfig().carry_evaluation == "auto" and RunConfig().evaluation_carried
    assert not RunConfig.from_flower({"fraction-train": 0.5}).evaluation_carried
    assert not RunConfig.from_flower({"secure-aggregation": True, "privacy": "user"}).evaluation_carried
    assert not RunConfig.from_flower({"carry-evaluation": False}).evaluation_carried
    assert RunConfig.from_flower({"carry-evaluation": True}).evaluation_carried
    # as `flwr run -c` and pyproject.toml give it: TOML values
    assert RunConfig.from_flower({"carry-evaluation": "auto", "fraction-train": 1.0}).evaluation_carried
    with pytest.raises(ConfigError, match="field 'carry-evaluation'"):
        RunConfig.from_flower({"carry-evaluation": "sometimes"})

def test_with_values_revalidates():
    cfg = RunConfig().with_values(num_rounds=3, **{"mf-solver": "sgd"})
    assert (cfg.num_rounds, cfg.mf_solver) == (3, "sgd")
    with pytest.raises(ConfigError):
        cfg.with_values(num_rounds=0)


def test_parse_override_takes_toml_values_or_bare_strings():
    assert parse_override("factors=32") == ("factors", 32)
    assert parse_override("resume=true") == ("resume", True)
    assert parse_override('mf-solver="sgd"') == ("mf-solver", "sgd")
    assert parse_override("partitioning=iid") == ("partitioning", "iid")
    with pytest.raises(ValueError, match="key=value"):
        parse_override("factors")


# ---------------------------------------------------------------- node config
def test_node_config_is_a_deployed_merchant_or_a_simulated_node(tmp_path):
    deployed = NodeConfig.from_flower({"data-path": "/srv/a/log.csv", "merchant-id": "a"})
    assert not deployed.simulated and deployed.name == "a"
    assert deployed.state_path(RunConfig(state_dir=str(tmp_path))) == tmp_path / "a"
    assert NodeConfig.from_flower({"data-path": "/srv/b/clicks.csv"}).name == "clicks"
    assert NodeConfig.from_flower({"data-path": "x.csv", "state-dir": "/s"}).state_path(RunConfig()) == Path("/s")
    simulated = NodeConfig.from_flower({"partition-id": 2, "num-partitions": 3})
    assert simulated.simulated and simulated.name == "partition-2"
    for bad, message in (
        ({}, "either data-path"),
        ({"data-path": "x.csv", "partition-id": 0, "num-partitions": 2}, "not both"),
        ({"partition-id": 3, "num-partitions": 3}, "out of num-partitions"),
        ({"data_path": "x.csv"}, "field 'data_path': Extra inputs"),
    ):
        with pytest.raises(ConfigError, match=message):
            NodeConfig.from_flower(bad)


def test_node_config_file_round_trips_and_names_file_line_and_field(tmp_path):
    written = NodeConfig(data_path="logs/a.csv", state_dir="state", merchant_id="a").write(tmp_path / "node.toml")
    loaded = NodeConfig.load(written)
    assert loaded.merchant_id == "a" and Path(loaded.data_path).is_absolute() and loaded.data_path.endswith("logs/a.csv")
    assert "catalog-path" not in written.read_text()  # unset keys are not written
    bad = tmp_path / "bad.toml"
    bad.write_text('merchant-id = "a"\ndata-path = "/a.csv"\nstate-dirr = "s"\n')
    with pytest.raises(ConfigError, match=rf"{bad}:3: field 'state-dirr': Extra inputs"):
        NodeConfig.load(bad)
    bad.write_text('merchant-id = "a"\ndata-path = "logs/a.csv"\n')  # relative to what? refused
    with pytest.raises(ConfigError, match=rf"{bad}:2: field 'data-path': 'logs/a.csv' must be an absolute path"):
        NodeConfig.load(bad)
    bad.write_text('data-path = "/a.csv"\npartition-id = "x"\n')
    with pytest.raises(ConfigError, match=rf"{bad}:2: field 'partition-id'"):
        NodeConfig.load(bad)
    bad.write_text("data-path = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        NodeConfig.load(bad)


def test_node_config_is_frozen():
    with pytest.raises(ValidationError):
        NodeConfig(data_path="a.csv").data_path = "b.csv"  # type: ignore[misc]
