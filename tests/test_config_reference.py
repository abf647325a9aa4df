"""docs/CONFIG.md is generated from the models, and README's experiment example is a valid file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import simulations.config_reference as config_reference
from shared.config import RunConfig
from shared.node_config import NodeConfig
from simulations.experiment import BaselineSpec, SweepSpec, load_experiment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_config_reference_is_generated_from_the_models():
    """Any drift (a key, a type, a bound, a default, a description) between the models and
    docs/CONFIG.md fails here; `python -m simulations.config_reference --write` regenerates it."""
    assert config_reference.current_reference() == config_reference.render_reference()
    assert config_reference.main(["--check"]) == 0


def test_the_reference_lists_every_key_of_every_model():
    text = config_reference.render_reference()
    for model in (RunConfig, SweepSpec, BaselineSpec, NodeConfig):
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, (model.__name__, name)
    assert "| `num-rounds` | int, >= 1 | `10` | federated training rounds |" in text
    assert "| `dataset` | `synthetic` \\| `movielens-100k` \\| `amazon-seq` \\| `logs` |" in text
    assert "| `clients` | list of int | `[5]` |" in text
    assert "| `partition-id` | int (optional), >= 0 | unset |" in text
    for title in ("### Outputs and state", "### Privacy (docs/PRIVACY.md)", "### `[sweep]`", "### `[baselines]`",
                  "### The merchant's privacy policy"):
        assert title in text


def test_the_drift_check_catches_an_edit_and_rewriting_restores_it(tmp_path):
    drifted = tmp_path / "CONFIG.md"
    drifted.write_text(config_reference.render_reference().replace("federated training rounds", "rounds", 1))
    assert config_reference.current_reference(drifted) != config_reference.render_reference()
    assert config_reference.write_reference(drifted) and drifted.read_text() == config_reference.render_reference()
    assert not config_reference.write_reference(drifted)


def test_an_undocumented_field_stops_the_generator():
    class Undocumented(BaseModel):
        documented: int = Field(1, description="has one")
        bare: int = 2

    with pytest.raises(ValueError, match="'bare' has no description"):
        config_reference.key_table(list(Undocumented.model_fields.items()))


def test_sections_must_start_at_fields():
    with pytest.raises(ValueError, match="sections must start at fields"):
        config_reference.sections(SweepSpec, {"no_such_field": "Title"})
    with pytest.raises(ValueError, match="sections must start at fields"):
        config_reference.sections(SweepSpec, {"seeds": "Not the first field"})


def test_table_cells_escape_pipes_and_tags_but_not_comparisons():
    assert config_reference._cell("a | b <= 1 <run state-dir>") == "a \\| b <= 1 \\<run state-dir>"


# ---------------------------------------------------------------- README
def _experiments_section() -> str:
    text = README.read_text()
    start = text.index("## Experiments (offline harness)")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_experiment_example_is_a_valid_experiment_file(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", _experiments_section(), flags=re.DOTALL)
    assert len(blocks) == 1
    path = tmp_path / "mine.toml"
    path.write_text(blocks[0])
    experiment = load_experiment(path)
    assert experiment.base.dataset == "logs"
    assert Path(experiment.base.data_path) == tmp_path / "data" / "clicks.csv"  # relative to the file
    assert Path(experiment.base.catalog_path) == tmp_path / "data" / "catalog.csv"
    assert "[baselines]" in blocks[0] and not experiment.baselines.local_only


def test_readme_points_to_the_reference_and_names_every_experiment_table_key():
    section = _experiments_section()
    assert "docs/CONFIG.md" in section and "docs/DATA.md" in section
    for model in (SweepSpec, BaselineSpec):
        for name, field in model.model_fields.items():
            assert f"`{field.alias or name}`" in section, name
