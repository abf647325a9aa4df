"""als-alpha0 = "auto" (issue 16): the unobserved pairs' weight from the density of the data each
party holds without DP, a public constant under DP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from client.node_data import NodeData
from client.solvers.als import ALSSolver
from shared.als import ALPHA0_PER_DENSITY, PRIVATE_ALPHA0, ALSSettings, Rows, ad_statistics, density_alpha0, solve_ads
from shared.config import RunConfig
from shared.data.sources import load_dataset
from tests.conftest import small_run_config


def test_auto_reads_the_density_without_dp_and_is_a_constant_under_dp() -> None:
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "none"})).alpha0 is None
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "user"})).alpha0 == PRIVATE_ALPHA0
    assert ALSSettings.from_config(RunConfig.from_flower({"privacy": "none", "als-alpha0": 0.03})).alpha0 == 0.03
    assert density_alpha0(rows=500, users=50, num_ads=200) == pytest.approx(ALPHA0_PER_DENSITY * 0.05)
    with pytest.raises(ValueError):
        RunConfig.from_flower({"als-alpha0": 0.0})
    with pytest.raises(ValueError):
        RunConfig.from_flower({"als-alpha0": "sometimes"})


def test_server_and_merchant_read_the_same_density_from_what_each_holds(tmp_path) -> None:
    cfg = small_run_config(tmp_path).with_values("test", privacy="none")
    dataset = load_dataset(cfg)
    data = NodeData.prepare(dataset.log, dataset.catalog, cfg.seed)
    rows, num_ads = data.rows, data.num_ads
    density = len(rows.ad) / (rows.num_users * num_ads)
    # the merchant's user step: its own rows
    solver = ALSSolver(cfg, data)
    assert solver.user_step().alpha0 == pytest.approx(ALPHA0_PER_DENSITY * density)
    # the server's ad step: the summed exact statistics (per-ad Gramians' and the user Gramian's bias entries; sparse)
    settings = ALSSettings.from_config(cfg)
    rng = np.random.default_rng(0)
    users = rng.normal(scale=0.1, size=(rows.num_users, cfg.factors))
    stats = ad_statistics(rows, users, num_ads, settings)
    explicit = dataclasses.replace(settings, alpha0=ALPHA0_PER_DENSITY * density)
    auto, fixed = solve_ads(stats, settings, num_ads=num_ads), solve_ads(stats, explicit, num_ads=num_ads)
    for key in fixed:
        np.testing.assert_allclose(auto[key], fixed[key], rtol=1e-5, atol=1e-7)
    # and the rule moves the model: a tenth of the density is another solution
    other = solve_ads(stats, dataclasses.replace(settings, alpha0=0.1 * ALPHA0_PER_DENSITY * density), num_ads=num_ads)
    assert not np.allclose(other["ad_factors"], auto["ad_factors"])


def test_sparser_data_weighs_its_unobserved_pairs_less() -> None:
    # a user with the same rows in a ten times larger catalog: alpha0 a tenth, the same total unobserved weight
    rows = Rows(np.zeros(4, dtype=np.int64), np.arange(4), np.ones(4), 1)
    small, large = density_alpha0(len(rows.ad), rows.num_users, 40), density_alpha0(len(rows.ad), rows.num_users, 400)
    assert small * 40 == pytest.approx(large * 400) and large == pytest.approx(small / 10)
