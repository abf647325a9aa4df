"""User-level DP (privacy = "user"): the accountant, the calibration, the merchant's ledger,
and the ClientApp's enforcement of the budget, end to end.

The accountant is checked against Google's `dp_accounting` (RDP of the Poisson-subsampled
Gaussian mechanism) and, where the two libraries differ, against a third computation: the RDP
integral evaluated numerically (see `exact_sgm_rdp`). What was found:

- At integer RDP orders the two libraries agree to ~1e-12 (the same closed-form binomial sum).
- At fractional orders (1.1 .. 10.9, 99 of Opacus' 150 default orders) they do not:
  dp_accounting 0.6.0's `_compute_log_a_frac` adds the absolute values of the terms of the
  (alternating) series of Mironov et al. 2019, Sec. 3.3, so it returns an upper bound, up to
  ~80% above the true RDP at alpha = 1.1, or inf where its series "fails to converge" in 1000
  terms (it then drops the order). Opacus sums the signed series and matches the numerical
  integral to ~1e-9. Where a fractional order is the optimal one (large epsilons, small
  alpha) dp_accounting's epsilon is therefore larger: e.g. q = 0.2, sigma = 0.8, 500 steps,
  delta = 1e-5: Opacus 62.93, dp_accounting 72.63. Opacus' value is the tight one.
- The RDP -> (epsilon, delta) conversions are the same formula (Balle et al. 2020, Thm. 21 =
  Canonne, Kamath, Steinke 2020, Prop. 12): eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1),
  minimized over the orders. dp_accounting additionally clamps at 0, treats a <= 1.01 as inf
  and uses a KL bound when rdp is below ~delta^2; none of these is reached by Opacus' orders
  (>= 1.1) at the deltas used here. Given the same RDP vector the two agree to 1e-12.
So `epsilon_of` is compared exactly to an independent computation: dp_accounting's RDP at the
integer orders, the numerical integral at the fractional ones, and dp_accounting's conversion.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as google_rdp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.special import logsumexp

import client.node_data
import shared.accounting
from client.node_state import NodeState
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger, PrivacyRefusal
from shared.accounting import (
    CalibrationError,
    calibrate_noise_multiplier,
    epsilon_of,
    renyi_epsilon,
    sgd_steps_per_epoch,
    unsampled_gaussian_epsilon,
)
from shared.als import ALSSettings, ad_statistics
from shared.content_affinity import ContentBlend
from shared.flower_internals import wire_bytes as _wire_bytes
from shared.metrics import METRIC_NAMES
from shared.params import GLOBAL_KEYS, init_global_arrays
from shared.wire import PRIVACY_REFUSED, from_array_record
from tests.conftest import client_call as _call
from tests.conftest import simulated_node, small_run_config

pytestmark = [
    pytest.mark.usefixtures("as_server"),
    # Opacus warns when the optimal order is the first or last of its orders (tiny releases)
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Secure RNG.*"),
]

ORDERS = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
INTEGER = np.array([float(a).is_integer() for a in ORDERS])
DELTA = 1e-5


# ====================================================================== accountant
def exact_sgm_rdp(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step, by numerical integration (independent of
    both libraries): (1 / (a - 1)) log E_{z ~ N(0, s^2)} [((1 - q) + q exp((2z - 1) / (2 s^2)))^a].

    The trapezoidal rule on a fine uniform grid is spectrally accurate for this smooth,
    Gaussian-tailed integrand; the integrand minus 1 is summed to avoid cancellation.
    """
    orders = np.asarray(orders, dtype=float)
    if q == 1.0:
        return orders / (2 * sigma**2)
    step = sigma / 40
    z = np.arange(-40 * sigma, 40 * sigma + orders.max() + 1, step)
    log_weight = -z * z / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2) + math.log(step)
    log_ratio = np.log1p(q * np.expm1((2 * z - 1) / (2 * sigma**2)))
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        log_a = float(logsumexp(log_weight + a * log_ratio))
        if log_a < 1e-2:  # near 0: sum (integrand - 1) instead, against cancellation
            x = a * log_ratio
            terms = np.where(x < 50, np.exp(log_weight) * np.expm1(np.minimum(x, 50)), np.exp(log_weight + x))
            log_a = math.log1p(float(np.sum(terms)))
        out[i] = log_a / (a - 1)
    return out


@functools.cache
def _exact_sgm_rdp_cached(q: float, sigma: float) -> np.ndarray:
    return exact_sgm_rdp(q, sigma, ORDERS)


def _google_event(history):
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in history
    ])


def _google_accountant(history, orders=ORDERS):
    accountant = google_rdp.RdpAccountant(orders=list(orders))
    accountant.compose(_google_event(history))
    return accountant


def _check_against_google(history, delta=DELTA):
    """Every comparison of the module docstring, for one composed history."""
    google = _google_accountant(history)
    g_rdp = google.rdp
    o_rdp = sum(opacus_rdp.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(ORDERS)) for s, q, n in history)
    exact = sum(n * _exact_sgm_rdp_cached(q, s) for s, q, n in history)

    # 1. integer orders: the two libraries agree
    np.testing.assert_allclose(o_rdp[INTEGER], g_rdp[INTEGER], rtol=1e-9)
    np.testing.assert_allclose(exact[INTEGER], g_rdp[INTEGER], rtol=1e-6)
    # 2. fractional orders: Opacus is the exact value; dp_accounting an upper bound of it (or inf)
    np.testing.assert_allclose(o_rdp[~INTEGER], exact[~INTEGER], rtol=1e-6)
    assert np.all(g_rdp[~INTEGER] >= o_rdp[~INTEGER] * (1 - 1e-9))

    # 3. the conversions are the same function of the RDP vector
    for rdp in (o_rdp, g_rdp):
        o_eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
        g_eps, _ = google_rdp.compute_epsilon(ORDERS, rdp, delta)
        assert o_eps == pytest.approx(g_eps, rel=1e-9)

    # 4. renyi_epsilon == an independent epsilon at the same orders: dp_accounting's RDP where it
    #    is exact (integer orders), the numerical integral elsewhere, dp_accounting's conversion
    independent = np.where(INTEGER, g_rdp, exact)
    expected, _ = google_rdp.compute_epsilon(ORDERS, independent, delta)
    ours = renyi_epsilon(history, delta)
    assert ours == pytest.approx(expected, rel=1e-3)
    assert epsilon_of(history, delta) <= ours

    # 5. both accountants whole, on the orders where both are exact: the same epsilon
    integer_orders = ORDERS[INTEGER]
    opacus = RDPAccountant()
    opacus.history = [tuple(h) for h in history]
    assert opacus.get_epsilon(delta, alphas=list(integer_orders)) == pytest.approx(
        _google_accountant(history, integer_orders).get_epsilon(delta), rel=1e-3
    )
    # 6. and dp_accounting's own epsilon at all of Opacus' orders is never below Opacus'
    assert ours <= google.get_epsilon(delta) * (1 + 1e-9)


@pytest.mark.parametrize("sigma", [0.8, 1.5, 4.0])
@pytest.mark.parametrize("q", [0.01, 0.05, 0.2, 1.0])
def test_epsilon_of_agrees_with_dp_accounting(q, sigma):
    for steps in (1, 50, 500):
        _check_against_google([(sigma, q, steps)])


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.05, 300), (20.0, 1.0, 3)],  # DP-SGD steps and noised metric releases, as a client records them
        [(2.0, 0.2, 40), (2.5, 0.01, 1000), (2.0, 0.2, 40)],
    ],
)
def test_composition_of_different_releases_agrees_with_dp_accounting(history):
    _check_against_google(history)
    # composition is order-free, and the sum of its parts in RDP (not in epsilon)
    assert epsilon_of(history[::-1], DELTA) == pytest.approx(epsilon_of(history, DELTA), rel=1e-12)
    assert epsilon_of(history, DELTA) < sum(epsilon_of([h], DELTA) for h in history)


def test_dp_accounting_is_looser_where_a_fractional_order_is_optimal():
    """The documented divergence: dp_accounting drops (inf) or over-bounds low fractional orders."""
    history = [(0.8, 0.2, 500)]
    ours, google = epsilon_of(history, DELTA), _google_accountant(history).get_epsilon(DELTA)
    assert google > 1.1 * ours  # 72.6 vs 62.9
    opacus = RDPAccountant()
    opacus.history = history
    _, best_order = opacus.get_privacy_spent(delta=DELTA)
    assert not float(best_order).is_integer()


def test_epsilon_of_empty_history_is_zero():
    assert epsilon_of([], DELTA) == 0.0


@pytest.mark.parametrize(
    "history",
    [[(0.8, 0.2, 500)], [(1.1, 0.05, 300), (20.0, 1.0, 3)], [(2.0, 0.2, 40), (2.5, 0.01, 1000), (2.0, 0.2, 40)], [(5.0, 1.0, 2)]],
)
def test_renyi_epsilon_is_opacus_rdp_accountant_with_cached_step_curves(history):
    """The per-step curves are cached; the epsilon is exactly what Opacus' own accountant says."""
    opacus = RDPAccountant()
    opacus.history = [tuple(h) for h in history]
    expected = opacus.get_epsilon(DELTA)
    assert renyi_epsilon(history, DELTA) == pytest.approx(expected, rel=1e-12)
    hits = shared.accounting._step_rdp.cache_info().hits
    assert renyi_epsilon(history, DELTA) == pytest.approx(expected, rel=1e-12)
    assert shared.accounting._step_rdp.cache_info().hits == hits + len(history)  # no curve recomputed


# ====================================================================== calibration
@pytest.mark.parametrize(
    "target, delta, q, steps, fixed",
    [
        (2.0, 1e-5, 0.2, 20, []),
        (3.0, 3e-4, 0.2, 30, [(20.0, 1.0, 3)]),
        (1.0, 1e-5, 0.05, 200, [(20.0, 1.0, 11)]),
        (4.0, 1e-5, 1.0, 10, []),
    ],
)
def test_calibrated_noise_reaches_the_target_from_below(target, delta, q, steps, fixed):
    sigma = calibrate_noise_multiplier(target, delta, q, steps, fixed=fixed)

    def spent(s):
        return epsilon_of([(s, q, steps), *fixed], delta)

    assert spent(sigma) <= target
    assert spent(sigma) >= 0.99 * target  # not wastefully noisy
    assert spent(sigma / (1 + 1e-3)) > target  # the next smaller sigma (calibration tolerance) is over
    if fixed:  # the fixed releases are part of the budget: training alone gets less than all of it
        assert epsilon_of([(sigma, q, steps)], delta) < spent(sigma)


def test_calibration_refuses_when_the_fixed_releases_alone_exceed_the_target():
    fixed = [(0.5, 1.0, 10)]
    assert epsilon_of(fixed, 1e-5) > 3.0
    with pytest.raises(CalibrationError, match="fixed releases alone"):
        calibrate_noise_multiplier(3.0, 1e-5, 0.1, 100, fixed=fixed)
    with pytest.raises(CalibrationError):
        calibrate_noise_multiplier(0.0, 1e-5, 0.1, 100)


# ====================================================================== ledger
def _ledger(directory: Path, target: float = 3.0, delta: float = 1e-5) -> PrivacyLedger:
    ledger = PrivacyLedger.open(directory)
    ledger.bind(target, delta)
    return ledger


def test_ledger_survives_a_restart(tmp_path):
    ledger = _ledger(tmp_path, target=10.0)
    ledger.state.noise_multiplier = 1.3
    ledger.record([(20.0, 1.0, 1)])
    ledger.record([(1.3, 0.2, 10)], trained_round=True)
    spent = ledger.epsilon()
    assert 0 < spent < 10.0

    reopened = PrivacyLedger.open(tmp_path)  # a new process reading the same directory
    assert reopened.state == ledger.state
    assert reopened.state.history == [(20.0, 1.0, 1), (1.3, 0.2, 10)]
    assert reopened.state.rounds_trained == 1 and reopened.state.exact_metric_releases == 0
    assert reopened.state.target_epsilon == 10.0 and reopened.state.delta == 1e-5
    assert reopened.epsilon() == pytest.approx(spent, rel=1e-12)
    assert reopened.epsilon() == pytest.approx(epsilon_of(reopened.state.history, 1e-5), rel=1e-12)


def test_require_refuses_a_release_past_the_budget(tmp_path):
    ledger = _ledger(tmp_path, target=3.0)
    ledger.record([(2.0, 0.2, 20)])
    before = list(ledger.state.history)
    after = ledger.require([(2.0, 0.2, 5)], "a small round")
    assert ledger.epsilon() < after <= 3.0

    with pytest.raises(PrivacyRefusal, match="budget exhausted") as refused:
        ledger.require([(2.0, 0.2, 500)], "training round 7")
    assert "training round 7" in str(refused.value) and "3.0" in str(refused.value)
    assert ledger.state.history == before  # a check, not a release
    assert PrivacyLedger.open(tmp_path).state.history == before


def test_a_non_private_release_rules_out_any_later_dp_claim(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.record_non_private(trained_round=True)
    assert PrivacyLedger.open(tmp_path).epsilon() == math.inf
    with pytest.raises(PrivacyRefusal, match="without DP"):
        PrivacyLedger.open(tmp_path).require([(50.0, 0.01, 1)], "anything")


def test_bind_refuses_a_raised_budget_or_another_delta(tmp_path):
    _ledger(tmp_path, target=3.0, delta=1e-5).save()
    ledger = PrivacyLedger.open(tmp_path)
    with pytest.raises(PrivacyRefusal, match="not raised"):
        ledger.bind(4.0, 1e-5)
    with pytest.raises(PrivacyRefusal, match="delta"):
        ledger.bind(3.0, 2e-5)
    assert (ledger.state.target_epsilon, ledger.state.delta) == (3.0, 1e-5)
    ledger.bind(3.0, 1e-5)  # the same budget again is fine
    ledger.bind(2.0, 1e-5)  # a lower one tightens it
    assert ledger.state.target_epsilon == 2.0


def _rewrite(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


CORRUPTIONS = {
    "garbage": lambda p: p.write_bytes(os.urandom(64) + b"\xff\xfe"),
    "empty": lambda p: p.write_text(""),
    "truncated": lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
    "edited-history": lambda p: _rewrite(p, lambda d: d["ledger"]["history"].pop()),
    "edited-target": lambda p: _rewrite(p, lambda d: d["ledger"].update(target_epsilon=100.0)),
    "no-checksum": lambda p: _rewrite(p, lambda d: d.pop("checksum")),
    "other-version": lambda p: _rewrite(p, lambda d: d.update(version=99)),
    "not-an-object": lambda p: p.write_text("[1, 2, 3]"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_ledger_fails_closed(tmp_path, corruption):
    ledger = _ledger(tmp_path)
    ledger.record([(1.0, 0.2, 20), (20.0, 1.0, 1)], trained_round=True)
    CORRUPTIONS[corruption](tmp_path / LEDGER_FILE)
    with pytest.raises(PrivacyRefusal, match="fail closed"):
        PrivacyLedger.open(tmp_path)  # for every run, private or not: a damaged DP ledger is never overwritten


@pytest.mark.parametrize("trace", ["user_factors.npz", "global_model.npz"])
def test_a_missing_ledger_fails_closed_where_the_client_has_trained(tmp_path, trace):
    (tmp_path / trace).write_bytes(b"earlier training")
    with pytest.raises(PrivacyRefusal, match="missing"):
        PrivacyLedger.open(tmp_path)


def test_a_missing_ledger_in_a_fresh_directory_is_a_fresh_start(tmp_path):
    ledger = PrivacyLedger.open(tmp_path)
    assert ledger.state.history == [] and ledger.epsilon() == 0.0
    assert not (tmp_path / LEDGER_FILE).exists()  # nothing written by opening


def test_ledger_writes_are_atomic_and_checksummed(tmp_path):
    ledger = _ledger(tmp_path)
    for i in range(5):
        ledger.record([(1.0 + i, 0.1, 3)], trained_round=True)
    assert sorted(os.listdir(tmp_path)) == [LEDGER_FILE]  # no leftover temporary files
    document = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert set(document) == {"version", "checksum", "ledger"}
    assert document["ledger"]["rounds_trained"] == 5 and len(document["ledger"]["history"]) == 5


# ====================================================================== the ClientApp, end to end
STEP_KEYS = {"dp-steps"}
PRIVACY_KEYS = {"dp-epsilon", "dp-noise-multiplier"}
DP_ALLOWED_METRICS = {
    "train": {"num-examples"} | STEP_KEYS | PRIVACY_KEYS,
    "evaluate": {"num-examples"} | set(METRIC_NAMES) | PRIVACY_KEYS,
}


def _dp_config(tmp_path, **overrides):
    values = {"num-rounds": 2, "target-epsilon": 1.0, "mf-solver": "sgd", **overrides}
    return small_run_config(tmp_path, privacy="user", **values)


def _state_dir(tmp_path, partition=0) -> Path:
    return tmp_path / "out" / "state" / f"partition-{partition}"


def _open_ledger_file(tmp_path, partition=0) -> dict:
    return json.loads((_state_dir(tmp_path, partition) / LEDGER_FILE).read_text())["ledger"]


def test_client_trains_until_the_budget_is_spent_and_then_refuses(tmp_path):
    cfg = _dp_config(tmp_path)
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    q = cfg.dp_sample_rate
    steps_per_round = cfg.local_epochs * sgd_steps_per_epoch(q)

    epsilons = []
    first = _call("evaluate", cfg, arrays, server_round=0)
    assert not first.has_error()
    epsilons.append(first.content["metrics"]["dp-epsilon"])
    trained, refusal = 0, None
    for server_round in range(1, cfg.num_rounds + 3):
        reply = _call("train", cfg, arrays, server_round=server_round)
        if reply.has_error():
            refusal = reply
            break
        trained += 1
        metrics = reply.content["metrics"]
        assert metrics["dp-steps"] == steps_per_round
        epsilons.append(metrics["dp-epsilon"])
        arrays = from_array_record(reply.content["arrays"])
        evaluated = _call("evaluate", cfg, arrays, server_round=server_round)
        assert not evaluated.has_error()
        epsilons.append(evaluated.content["metrics"]["dp-epsilon"])

    # the planned rounds ran, the next one was refused with an error reply that says why
    assert trained == cfg.num_rounds
    assert refusal is not None and refusal.error.code == PRIVACY_REFUSED
    assert "budget exhausted" in refusal.error.reason and f"training round {cfg.num_rounds + 1}" in refusal.error.reason
    assert not refusal.has_content()
    # epsilon only grows, never past the target, and ends close to it (the plan was used)
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    assert max(epsilons) <= cfg.target_epsilon * (1 + 1e-9)
    assert epsilons[-1] >= 0.99 * cfg.target_epsilon

    # the ledger on the merchant's disk holds exactly what was released
    ledger = _open_ledger_file(tmp_path)
    sigma = ledger["noise_multiplier"]
    metric_release = [cfg.metrics_noise_multiplier, 1.0, 1]
    assert ledger["rounds_trained"] == cfg.num_rounds
    assert ledger["history"] == [metric_release, [sigma, q, steps_per_round]] * cfg.num_rounds + [metric_release]
    assert epsilon_of([tuple(h) for h in ledger["history"]], ledger["delta"]) == pytest.approx(epsilons[-1], rel=1e-9)
    # sigma was calibrated to the whole plan: num-rounds of training and num-rounds + 1 metric releases
    plan = [(cfg.metrics_noise_multiplier, 1.0, cfg.num_rounds + 1)]
    assert epsilon_of([(sigma, q, cfg.num_rounds * steps_per_round), *plan], ledger["delta"]) <= cfg.target_epsilon
    assert epsilon_of([(sigma / 1.001, q, cfg.num_rounds * steps_per_round), *plan], ledger["delta"]) > cfg.target_epsilon

    # a restart (a new process: no cached data) keeps the budget spent
    client.node_data._simulated_node.cache_clear()
    again = _call("train", cfg, arrays, server_round=cfg.num_rounds + 1)
    assert again.has_error() and "budget exhausted" in again.error.reason
    assert _open_ledger_file(tmp_path) == ledger
    # nor does a config that asks for a bigger budget raise it
    client.node_data._simulated_node.cache_clear()
    bigger = _call("train", _dp_config(tmp_path, **{"target-epsilon": 50.0}), arrays, server_round=cfg.num_rounds + 1)
    assert bigger.has_error() and "not raised" in bigger.error.reason
    assert _open_ledger_file(tmp_path) == ledger


def test_client_with_a_damaged_ledger_refuses_instead_of_training(tmp_path):
    cfg = _dp_config(tmp_path)
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    assert not _call("train", cfg, arrays, server_round=1).has_error()

    state = _state_dir(tmp_path)
    path, factors, model = state / LEDGER_FILE, state / "user_factors.npz", state / "global_model.npz"
    good = path.read_bytes()
    factors_before, model_before = factors.read_bytes(), model.read_bytes()

    def assert_refused():
        damaged = path.read_bytes() if path.exists() else None
        for kind in ("train", "evaluate"):
            reply = _call(kind, cfg, arrays, server_round=2)
            assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
            assert "fail closed" in reply.error.reason
            assert not reply.has_content()
        # nothing was trained or written: the ledger is neither reset nor repaired
        assert (path.read_bytes() if path.exists() else None) == damaged
        assert factors.read_bytes() == factors_before and model.read_bytes() == model_before

    CORRUPTIONS["edited-history"](path)  # an altered ledger: a smaller spend, stale checksum
    assert_refused()
    path.unlink()  # a lost ledger in a directory that has trained
    assert_refused()

    path.write_bytes(good)  # the ledger restored: the client goes on where it was
    reply = _call("train", cfg, arrays, server_round=2)
    assert not reply.has_error()
    assert _open_ledger_file(tmp_path)["rounds_trained"] == 2


# ====================================================================== what leaves under DP
@pytest.mark.parametrize("solver", ["sgd", "als"])
def test_dp_replies_carry_no_user_id_no_user_factor_and_no_unaccounted_metric(tmp_path, solver):
    cfg = _dp_config(tmp_path, **{"mf-solver": solver})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)

    for server_round, kind in enumerate(["evaluate", "train"]):
        reply = _call(kind, cfg, arrays, server_round=server_round)
        assert not reply.has_error()
        content = reply.content
        assert set(content.metric_records) == {"metrics"}
        metrics = dict(content["metrics"])
        # ALS: one release, no steps, and no weight (the server sums statistics); its budget share, public
        allowed = DP_ALLOWED_METRICS[kind]
        if solver == "als" and kind == "train":
            allowed = allowed - STEP_KEYS - {"num-examples"} | {"dp-release-share"}
        assert set(metrics) == allowed
        assert not any(key.startswith("merchant-pop-") for key in metrics)
        assert "train-loss" not in metrics and "train-rows" not in metrics
        assert 0 < metrics["dp-epsilon"] <= cfg.target_epsilon
        assert dict(content["client"]) == {"name": node.name, "server-round": server_round}  # who answers, and which round
        if kind == "train" and solver == "als":
            sent = from_array_record(content["arrays"])
            stored = NodeState(_state_dir(tmp_path)).load_user_factors(node.data.user_ids, cfg.factors)
            settings = ALSSettings.from_config(cfg)
            exact = ad_statistics(node.data.rows, stored, node.data.num_ads, settings)
            assert set(sent) == set(settings.release_keys())  # the statistics; the positives are the popularity release's
            for key in sent:  # noised, every coordinate
                assert np.all(sent[key] != exact[key].astype(np.float32))
        elif kind == "train":
            sent = from_array_record(content["arrays"])
            assert set(sent) == set(GLOBAL_KEYS)
            assert not np.allclose(sent["ad_factors"], arrays["ad_factors"])
        else:
            assert not content.array_records

        factors = NodeState(_state_dir(tmp_path)).load_user_factors(node.data.user_ids, cfg.factors)
        assert factors is not None and np.abs(factors).sum() > 0
        if kind == "evaluate":  # the released metrics are noised, not the exact ones
            exact = node.data.evaluate(arrays, factors, ContentBlend.from_config(cfg))
            assert any(metrics[name] != exact[name] for name in METRIC_NAMES)
            assert metrics["num-examples"] != exact["num-test-users"]
        wire = _wire_bytes(reply)
        assert len(wire) > 0
        for user_id, row in zip(node.data.user_ids, factors):
            assert str(user_id).encode() not in wire
            assert row.astype(np.float32).tobytes() not in wire
            assert row.astype(np.float64).tobytes() not in wire


def test_dp_metrics_none_releases_no_ranking_metric_and_spends_nothing(tmp_path):
    cfg = _dp_config(tmp_path, **{"dp-metrics": "none"})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    reply = _call("evaluate", cfg, arrays, server_round=0)
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples"} | PRIVACY_KEYS
    assert metrics["num-examples"] == 1.0 and metrics["dp-epsilon"] == 0.0
    assert _open_ledger_file(tmp_path)["history"] == []
    # and its calibration planned no metric releases: all of the budget goes to training
    ledger = _open_ledger_file(tmp_path)
    q = cfg.dp_sample_rate
    steps = cfg.num_rounds * cfg.local_epochs * sgd_steps_per_epoch(q)
    sigma = ledger["noise_multiplier"]
    assert 0.99 * cfg.target_epsilon <= epsilon_of([(sigma, q, steps)], ledger["delta"]) <= cfg.target_epsilon


def test_a_non_private_evaluation_is_recorded_in_the_ledger(tmp_path):
    """(A state directory with a DP ledger refuses it: tests/test_privacy_policy.py.)"""
    plain = small_run_config(tmp_path, privacy="none", **{"num-rounds": 2})
    node = simulated_node(plain, 0)
    arrays = init_global_arrays(node.data.split.num_ads, plain.factors, plain.seed)
    reply = _call("evaluate", plain, arrays, server_round=1)
    assert not reply.has_error()
    assert any(key.startswith("merchant-pop-") for key in reply.content["metrics"])  # exact, non-private

    ledger = PrivacyLedger.open(_state_dir(tmp_path))
    assert ledger.state.non_private_releases == 1 and ledger.epsilon() == math.inf


def test_a_delta_not_below_one_over_users_is_refused(tmp_path):
    cfg = _dp_config(tmp_path, **{"target-delta": 0.05})
    node = simulated_node(cfg, 0)
    assert 0.05 >= 1 / node.data.split.num_users  # a simulated node's policy delta is its run's: too large here
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    for kind in ("train", "evaluate"):
        reply = _call(kind, cfg, arrays, server_round=1)
        assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
        assert "not below 1 / max-users" in reply.error.reason and "Value error" not in reply.error.reason
    assert not (_state_dir(tmp_path) / LEDGER_FILE).exists()


def test_a_budget_too_small_for_the_planned_metric_releases_is_refused_with_an_error_reply(tmp_path):
    cfg = _dp_config(tmp_path, **{"num-rounds": 10, "target-epsilon": 0.3})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    try:
        for kind in ("evaluate", "train"):
            reply = _call(kind, cfg, arrays, server_round=1)
            assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
            assert "budget" in reply.error.reason
    finally:  # fail closed either way: nothing was written to the merchant's state directory
        assert not _state_dir(tmp_path).exists() or not any(_state_dir(tmp_path).iterdir())


def _analytic_gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP (Balle and Wang 2018, Thm. 8), in log space: independent of Opacus."""
    from scipy.stats import norm

    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2)))


@pytest.mark.parametrize("history", [[(0.6, 1.0, 2)], [(4.2, 1.0, 1), (20.0, 1.0, 11)], [(1.3, 1.0, 1), (0.9, 1.0, 1)]])
def test_unsampled_gaussian_releases_get_their_exact_epsilon(history):
    """Unsampled Gaussian releases (private ALS, noised metrics) compose exactly to mu-GDP: the
    epsilon at which the analytic Gaussian's delta equals the target is what epsilon_of says,
    and it is below RDP's bound."""
    from scipy.optimize import brentq

    mu = math.sqrt(sum(steps / sigma**2 for sigma, _, steps in history))
    expected = brentq(lambda e: _analytic_gaussian_delta(e, mu) - DELTA, 0.0, 200.0)
    assert epsilon_of(history, DELTA) == pytest.approx(expected, rel=1e-6)
    assert unsampled_gaussian_epsilon(history, DELTA) == pytest.approx(expected, rel=1e-6)
    assert expected < renyi_epsilon(history, DELTA)


def test_a_subsampled_release_keeps_the_renyi_bound():
    history = [(1.1, 0.05, 300), (20.0, 1.0, 3)]
    assert unsampled_gaussian_epsilon(history, DELTA) is None
    assert epsilon_of(history, DELTA) == renyi_epsilon(history, DELTA)


def test_the_exact_bound_needs_noticeably_less_noise_for_private_als():
    """What the exact bound buys: the noise variance private ALS needs at epsilon 8 for 2 releases."""
    exact = calibrate_noise_multiplier(8.0, 1e-6, 1.0, steps=2)
    renyi_only = 0.9 * exact
    while renyi_epsilon([(renyi_only, 1.0, 2)], 1e-6) > 8.0:
        renyi_only *= 1.001
    assert 0.8 < (exact / renyi_only) ** 2 < 0.95


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("delta", [1e-8, 1e-6, 1e-3])
def test_the_exact_gaussian_curve_is_opacus_gdp_without_importing_it(mu, delta):
    from opacus.accountants.analysis.gdp import delta_eps_mu, eps_from_mu

    history = [(1.0 / mu, 1.0, 1)]
    if delta_eps_mu(eps=0.0, mu=mu) <= delta:
        assert unsampled_gaussian_epsilon(history, delta) == 0.0
    else:
        assert unsampled_gaussian_epsilon(history, delta) == pytest.approx(eps_from_mu(mu=mu, delta=delta), rel=1e-9)
    for eps in (0.0, 0.5, 3.0):
        assert shared.accounting.gaussian_delta(eps, mu) == pytest.approx(delta_eps_mu(eps=eps, mu=mu), rel=1e-9, abs=1e-300)
    # unsampled histories skip RDP: the exact curve is never above its bound
    assert epsilon_of(history, delta) <= renyi_epsilon(history, delta) * (1 + 1e-12)


PRIVATE_ALS_MESSAGE = """
import sys
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from client.client_app import app
from shared.config import RunConfig
from shared.flower_internals import server_identity
from shared.params import initial_model
from shared.data.sources import load_dataset
from shared.wire import ARRAYS, CONFIG, SERVER_ROUND, to_array_record
cfg = RunConfig.from_flower({"privacy": "user", "dp-metrics": "none", "synthetic-users": 300, "synthetic-ads": 80, "synthetic-merchants": 3,
                             "num-rounds": 2, "state-dir": sys.argv[1], "output-dir": sys.argv[1]})
arrays = initial_model(cfg, load_dataset(cfg).catalog)
with server_identity():
    msg = Message(content=RecordDict({ARRAYS: to_array_record(arrays), CONFIG: ConfigRecord({SERVER_ROUND: 1})}), dst_node_id=10,
                  message_type="train")
    reply = app(msg, Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                             run_config=cfg.to_flower()))
assert not reply.has_error(), reply.error
print("torch" in sys.modules, "opacus" in sys.modules)
"""


def test_a_private_als_message_never_imports_torch(tmp_path):
    """A deployed SuperNode starts a ClientApp process per message: private ALS's accounting is
    closed-form (the exact Gaussian curve), so its process never pays for importing torch."""
    done = subprocess.run([sys.executable, "-c", PRIVATE_ALS_MESSAGE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert list(tmp_path.rglob(LEDGER_FILE))  # the release went through its ledger
