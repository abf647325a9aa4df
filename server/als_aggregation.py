"""The server's half of ALS: sum the clients' sufficient statistics and solve the ad step.

A Flower `FedAvg` whose training aggregation is a sum followed by the closed-form ad solve of
shared/als.py, instead of a weighted mean of parameters: sampling, configuration and the
evaluation rounds stay FedAvg's. Under DP the clients' statistics arrive noised; the noise
each one carries is public (its noise multiplier, in its reply, times the public
sensitivities), so the solve knows the summed noise level and regularizes against it.

Under DP a run starts with a popularity release (the ads' noisy positive counts alone,
shared/als.py): the strategy asks for it in round 1 (the `als-release` of its training
config), and from it decides once whether the data carry signal enough for a personal model
(the popularity rule, POPULARITY_MIN_SIGNAL). If not, every later round asks for popularity
again and the model ranks by the pooled counts: the run ends at the DP-popularity floor, and its
round records say so (`als-ranks-by-popularity`, `als-popularity-signal`). If so, the model
serves the pooled counts (its bias, on the warm start's factors) until the first statistics
release, which trains from the warm start itself (`begin_round` hands out the model a round
trains from).

Free gains from post-processing, only reading released values:
- ad counts (weighted positives and rows) do not depend on the round's user factors, so
  every round's noisy release of them is averaged with the earlier ones by inverse variance
  (the strategy's state, checkpointed every round: a resume keeps it);
- the noisy counts shrink the factors of rarely seen ads (ALSSettings.count_shrinkage),
  towards zero or (als-catalog-prior, on by default) towards als-catalog-prior-weight x the mean
  factors of their public catalog tags;
- each ad's score leans on its pooled noisy popularity, the more the lower the signal
  (POPULARITY_LEAN / signal spreads of the personal scores), and the model a statistics release
  before the plan's last serves leans further, by how much noisier that release is than the
  last (`serving_lean`); the next round trains from the model as solved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.reply_bounds import als_violations, median_clip
from shared.als import (
    POPULARITY_LEAN,
    POPULARITY_MIN_SIGNAL,
    POPULARITY_SHARE,
    ALSSettings,
    TouchedSum,
    ads_statistics_counts,
    check_statistics,
    lean_on_popularity,
    own_factor_weights,
    popularity_model,
    popularity_signal,
    solve_ads,
)
from shared.app_log import log
from shared.privacy_policy import DEFAULT_MAX_USERS
from shared.wire import (
    AD_BIAS,
    AD_FACTORS,
    ALS_COUNT,
    ALS_POSITIVES,
    ALS_RELEASE,
    ALS_USER_GRAM,
    DP_RELEASE_SHARE,
    POPULARITY,
    POPULARITY_SIGNAL,
    RANKS_BY_POPULARITY,
    STATISTICS,
    Arrays,
    PrivacyReport,
    TrainReply,
    from_array_record,
    to_array_record,
)

ROUND_INVARIANT = (ALS_POSITIVES, ALS_COUNT)
ADS_ON_PRIOR = "als-ads-on-prior"  # share of ads whose own factors weigh under half (count shrinkage)
_STATE_VARIANCE = "variance/"  # server state keys: "<statistic>" and "variance/<statistic>", "signal"
_TRAIN_BIAS = "train-bias"  # server state key: the bias the next round trains from, when it is not the one served


class ALSAggregation(FedAvg):
    needs_weights = False  # statistics are summed: a reply carries no count of users (under DP it must not)

    def __init__(
        self, settings: ALSSettings, num_ads: int, dim: int, tags: np.ndarray | None = None,
        max_users: int = DEFAULT_MAX_USERS, robust_factor: float | None = None, num_rounds: int = 2, **fedavg_args: Any,
    ) -> None:
        super().__init__(**fedavg_args)
        self.settings, self.num_ads, self.dim, self.tags = settings, num_ads, dim, tags
        self.max_users, self.robust_factor = max_users, robust_factor
        # running inverse-variance average of the round-invariant statistics: (value, variance)
        self._counts: dict[str, tuple[np.ndarray, float]] = {}
        # the popularity rule's signal (None: not decided yet) and the planned number of releases
        self.signal: float | None = None
        self.num_rounds = num_rounds
        # the rule's constants (shared/als.py; benchmarks vary them)
        self.min_signal, self.lean = POPULARITY_MIN_SIGNAL, POPULARITY_LEAN
        self.release = STATISTICS  # what the round under way asks for
        self._sent: Arrays = {}  # the model the round under way trains from
        # the bias the next statistics release trains from when the model serves another: 0 under
        # the popularity counts a warm start serves, the solved bias under a serving lean
        self._train_bias: np.ndarray | None = None
        # the run's warm-start factors, where known (the ServerApp's): a model with these factors has
        # had no statistics release yet, also after a resume that lost the server state
        self.warm_factors: np.ndarray | None = None
        # the run's planned budget share per release (shared/als.py release_budget_shares, public),
        # where known: an earlier statistics release is noisier than the last, and the model it
        # serves leans on popularity the more (`serving_lean`); the next round trains without that
        self.release_shares: np.ndarray | None = None
        self._round = 0

    @property
    def ranks_by_popularity(self) -> bool:
        return self.settings.private and (self.num_rounds == 1 or (self.signal is not None and self.signal < self.min_signal))

    def release_for(self, server_round: int) -> str:
        """What a round asks for: without DP, statistics; under DP, popularity until the rule has
        its counts (round 1, or after a resume that lost them) and whenever it chose popularity."""
        if not self.settings.private:
            return STATISTICS
        if self.signal is None or ALS_POSITIVES not in self._counts or self.ranks_by_popularity:
            return POPULARITY
        return STATISTICS

    def begin_round(self, server_round: int, arrays: Arrays) -> tuple[str, Arrays]:
        """Fix what the round asks for and the model it trains from (`arrays`, with the bias it was
        solved with where it serves another: 0 under the popularity counts a warm start serves, the
        solved bias under a serving lean): configure_train's first step."""
        self.release, self._round = self.release_for(server_round), server_round
        self._sent = arrays
        if self.release != STATISTICS:
            return self.release, self._sent
        # served counts are a ranking, not a bias to fit the users' residuals to (as they would be
        # in the user step: it cost Beauty a tenth of its NDCG@10); a serving lean the same
        train_bias = self._train_bias
        if train_bias is None and self._is_warm_start(arrays):  # a resume that lost the state
            train_bias = np.zeros_like(arrays[AD_BIAS])
        if train_bias is not None and len(train_bias) == len(arrays[AD_BIAS]):
            self._sent = {**arrays, AD_BIAS: train_bias}
        elif train_bias is not None:
            log.warning("private ALS: the bias to train from in the server state has %d ads, the model %d: training "
                        "from the model as served", len(train_bias), len(arrays[AD_BIAS]))
        return self.release, self._sent

    def serving_lean(self, server_round: int, share: float | None = None) -> float:
        """How much more than the solved model the served one leans on popularity after statistics
        release `server_round` of budget share `share` (the replies' public report; absent: the
        plan's for that round): the popularity lean (lean / signal spreads of the leaned model's
        scores) times how much noisier this release is than the plan's last one, sqrt(last share
        / its share) - 1, so 0 for the last release: a run that completes its plan ends on the
        solved model (one that stops short exports the model it serves)."""
        shares = self.release_shares
        if shares is None or not self.signal:
            return 0.0
        if share is None:
            if not 1 <= server_round <= len(shares):
                return 0.0
            share = float(shares[server_round - 1])
        return self.lean / self.signal * max(math.sqrt(float(shares[-1]) / share) - 1.0, 0.0)

    def _is_warm_start(self, arrays: Arrays) -> bool:
        factors = arrays.get(AD_FACTORS)
        return self.warm_factors is not None and factors is not None and np.array_equal(factors, self.warm_factors)

    @property
    def sent(self) -> Arrays:
        """The model the round under way trains from (set by begin_round)."""
        return self._sent

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        model = from_array_record(arrays)
        _, trains_from = self.begin_round(server_round, model)
        asked = ConfigRecord(dict(config))
        asked[ALS_RELEASE] = self.release
        return super().configure_train(server_round, arrays if trains_from is model else to_array_record(trains_from), asked, grid)

    def check_reply(self, arrays: Arrays, metrics: dict[str, float]) -> None:
        """The keys, shapes and finiteness, then the protocol's bounds (server/reply_bounds.py)."""
        check_statistics(arrays, self.settings, self.num_ads, self.dim, self.release)
        privacy = PrivacyReport.from_metrics(metrics)
        problems = als_violations(arrays, self.settings, self.max_users, privacy.noise_multiplier if privacy else 0.0, self.release)
        if problems:
            raise ValueError("; ".join(problems))

    def forget_counts(self) -> None:
        """Drop the pooled row counts (benchmarks: the gain of pooling them), never the positives."""
        self._counts.pop(ALS_COUNT, None)

    def state(self) -> Arrays:
        """What a resume needs (server/checkpoint.py): the pooled counts and the rule's signal
        (without DP nothing: every round's statistics are exact)."""
        state: Arrays = {}
        if not self.settings.private:
            return state
        for key, (value, variance) in self._counts.items():
            state[key], state[_STATE_VARIANCE + key] = value, np.array(variance)
        if self.signal is not None:
            state["signal"] = np.array(self.signal)
        if self._train_bias is not None:
            state[_TRAIN_BIAS] = self._train_bias
        return state

    def after_popularity(self, positives: np.ndarray, variance: float, signal: float) -> None:
        """Start as if a popularity round had pooled `positives` (noise `variance` per ad) and the
        rule had read `signal` (benchmarks that time one statistics round)."""
        self._counts[ALS_POSITIVES] = (positives, variance)
        self.signal = signal

    def restore(self, state: Arrays) -> None:
        """The state of `state()`. (A resume that lost its state file asks for popularity again; the
        warm-start strip still applies through warm_factors, but a serving lean then stays in the
        bias the next statistics release trains from: accuracy, not privacy.)"""
        self._counts = {key: (value, float(state[_STATE_VARIANCE + key])) for key, value in state.items()
                        if key in ROUND_INVARIANT and _STATE_VARIANCE + key in state}
        self.signal = float(state["signal"]) if "signal" in state else None
        self._train_bias = state.get(_TRAIN_BIAS)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies reach here validated (server/round_loop.py); error replies are left out."""
        replies = list(replies)
        valid = [msg for msg in replies if not msg.has_error()]
        log.info("aggregate_train: Received %s results and %s failures", len(valid), len(replies) - len(valid))
        for msg in replies:
            if msg.has_error():
                log.info("\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason)
        if not valid:
            return None, None
        total: Arrays = {}
        touched = TouchedSum(self.num_ads) if self.settings.sparse else None
        add = touched.add if touched is not None else (lambda arrays: _accumulate(total, arrays))
        metrics = []
        if self.robust_factor is not None:  # the median needs every reply at once
            replies_in = [TrainReply.from_message(msg) for msg in valid]
            metrics = [reply.metric_record() for reply in replies_in]
            for arrays in median_clip([reply.arrays for reply in replies_in], self.robust_factor):
                add(arrays)
        else:  # one reply's arrays at a time: no copy of every reply beside the messages
            for msg in valid:
                reply = TrainReply.from_message(msg)
                metrics.append(reply.metric_record())
                add(reply.arrays)
        return self.solve(touched.total() if touched is not None else total, metrics)

    def solve(self, total: Arrays, metrics: list[dict[str, float]]) -> tuple[ArrayRecord, MetricRecord]:
        """The ads from the summed statistics of the releases whose metrics are `metrics` (the
        plain path's sum, or the secure path's unmasked one: server/secure_round.py)."""
        # each release's noise multiplier is public (a function of its merchant's budget plan)
        reports = [PrivacyReport.from_metrics(record) for record in metrics]
        # without DP the statistics are exact: a reply's claim of noise is ignored (no sensitivities to scale it)
        stds = (self.settings.summed_noise_stds([report.noise_multiplier for report in reports if report], self.release)
                if self.settings.private else {})
        # a key outside the release's (exact statistics handed to solve directly) carries no noise
        variances = {key: stds.get(key, 0.0) ** 2 for key in total}
        for key in ROUND_INVARIANT:
            if key in total:
                total[key], variances[key] = self._average_counts(key, total[key], variances[key])
        record = _mean_metrics(metrics)
        if self.release == POPULARITY:
            arrays = self._after_popularity(total[ALS_POSITIVES], metrics, record)
            return to_array_record(arrays), record
        if self.settings.private and ALS_POSITIVES not in total:  # the popularity releases' counts, pooled
            if ALS_POSITIVES not in self._counts:
                raise ValueError("private ALS solves the ads with the popularity releases' counts, and none has come yet")
            total[ALS_POSITIVES], variances[ALS_POSITIVES] = self._counts[ALS_POSITIVES]
        stds = {key: float(np.sqrt(v)) for key, v in variances.items()}
        arrays = solve_ads(total, self.settings, stds, self.tags, self.num_ads)
        if self.settings.private and self.signal:
            arrays = lean_on_popularity(arrays, total[ALS_POSITIVES], total[ALS_USER_GRAM], self.settings.user_clip,
                                        self.lean / self.signal)
            record[POPULARITY_SIGNAL], record[RANKS_BY_POPULARITY] = self.signal, 0.0
        served, self._train_bias = arrays, None  # the model has its own bias now
        reported = [float(m[DP_RELEASE_SHARE]) for m in metrics if DP_RELEASE_SHARE in m]  # each merchant's own release count
        if (extra := self.serving_lean(self._round, float(np.median(reported)) if reported else None)) > 0:
            served = lean_on_popularity(arrays, total[ALS_POSITIVES], total[ALS_USER_GRAM], self.settings.user_clip, extra)
            self._train_bias = arrays[AD_BIAS]
        weights = own_factor_weights(ads_statistics_counts(total, self.settings), self.settings, stds) if self.settings.private else None
        if weights is not None:
            # how much of the model is popularity: an ad whose noisy count is below kappa noise
            # stds keeps under half its own factors, and its score is mostly its bias (or prior)
            on_prior = float(np.mean(weights < 0.5))
            record[ADS_ON_PRIOR] = on_prior
            if on_prior > 0.5:
                log.warning("private ALS: %.0f%% of the ads are seen by fewer users than the noise in their counts: "
                            "for them the model ranks by (noisy) popularity%s", 100 * on_prior,
                            " and their catalog tags" if self.tags is not None else "")
        return to_array_record(served), record

    def _after_popularity(self, positives: np.ndarray, metrics: list[dict[str, float]], record: MetricRecord) -> Arrays:
        """The model after a popularity round: ranking by the pooled counts if the rule chose
        popularity, else the model sent (its first statistics round starts from it), with the
        counts as its bias if it is a warm start."""
        if self.signal is None:
            noise, whole_budget = self._popularity_noise(metrics)
            self.signal = popularity_signal(positives, noise, whole_budget)
            if self.ranks_by_popularity:
                log.warning("private ALS ranks by popularity: %s", "a run of one round releases popularity only"
                            if self.num_rounds == 1 else
                            f"the ads' counts carry a signal of {self.signal:.1f} noise stds, under the "
                            f"{self.min_signal:g} a personal model needs to beat popularity at this noise "
                            "(more users, more epsilon or secure aggregation lower the noise): every round "
                            "releases counts, and the model is the DP-popularity ranking")
            else:
                log.info("private ALS: the ads' counts carry a signal of %.1f noise stds (a personal model "
                         "needs %g): the next rounds release statistics", self.signal, self.min_signal)
        record[POPULARITY_SIGNAL] = self.signal
        record[RANKS_BY_POPULARITY] = float(self.ranks_by_popularity)
        ranking = popularity_model(positives, self.dim)
        if self.ranks_by_popularity:
            return ranking
        if self._is_warm_start(self._sent) or not np.any(self._sent[AD_BIAS]):
            # a warm start (its bias 0, or an earlier popularity release's counts) ranks at random:
            # until the first statistics release the model serves the released counts' ranking,
            # as the popularity model does (that release trains from the warm start: begin_round)
            self._train_bias = np.zeros_like(self._sent[AD_BIAS])
            return {**self._sent, AD_BIAS: ranking[AD_BIAS]}
        return self._sent

    def _popularity_noise(self, metrics: list[dict[str, float]]) -> tuple[float, float]:
        """The noise std per ad of this popularity sum, and of one made with each merchant's whole
        budget, from the replies' public reports: a release's share (DP_RELEASE_SHARE, its plan's;
        absent: the first release's) scales its multiplier to the whole budget's. Each from the
        median merchant times sqrt(merchants): one merchant misreporting its noise cannot move
        the rule's decision for everyone."""
        carried, whole = [], []
        for record in metrics:
            report = PrivacyReport.from_metrics(record)
            if report is None:
                continue
            share = record.get(DP_RELEASE_SHARE, 1.0 if self.num_rounds == 1 else POPULARITY_SHARE)
            carried.append(report.noise_multiplier)
            whole.append(report.noise_multiplier * float(np.sqrt(share)))
        if not carried:
            return 0.0, 0.0

        def summed(multipliers: list[float]) -> float:
            typical = float(np.median(multipliers)) * float(np.sqrt(len(multipliers)))
            return self.settings.summed_noise_stds([typical], POPULARITY)[ALS_POSITIVES]

        return summed(carried), summed(whole)

    def _average_counts(self, key: str, value: np.ndarray, variance: float) -> tuple[np.ndarray, float]:
        if key not in self._counts or variance == 0.0:
            self._counts[key] = (value, variance)
            return value, variance
        earlier, earlier_variance = self._counts[key]
        if earlier_variance == 0.0:
            log.warning("ALS: exact counts earlier, noisy now: keeping the exact ones")
            return earlier, 0.0
        weight = (1.0 / earlier_variance) / (1.0 / earlier_variance + 1.0 / variance)
        averaged = weight * earlier + (1.0 - weight) * value
        combined = 1.0 / (1.0 / earlier_variance + 1.0 / variance)
        self._counts[key] = (averaged, combined)
        return averaged, combined


def _accumulate(total: Arrays, arrays: Arrays) -> None:
    """Add a reply's statistics into the running float64 sum, in place."""
    for key, value in arrays.items():
        if key in total:
            total[key] += value
        else:
            total[key] = value.astype(np.float64)


def _mean_metrics(records: list[dict[str, float]]) -> MetricRecord:
    """Each metric's mean over the replies that carry it, unweighted (ALS replies carry no weight)."""
    keys = dict.fromkeys(key for record in records for key in record)
    return MetricRecord({key: float(np.mean([r[key] for r in records if key in r])) for key in keys})
