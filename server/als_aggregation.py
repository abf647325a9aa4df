"""The server's half of ALS: sum the clients' sufficient statistics and solve the ad step.

A Flower `FedAvg` whose training aggregation is a sum followed by the closed-form ad solve of
shared/als.py, instead of a weighted mean of parameters: sampling, configuration and the
evaluation rounds stay FedAvg's. Under DP the clients' statistics arrive noised; the noise
each one carries is public (its noise multiplier, in its reply, times the public
sensitivities), so the solve knows the summed noise level and regularizes against it.

Two free gains from post-processing, both only reading released values:
- ad counts (weighted positives and rows) do not depend on the round's user factors, so
  every round's noisy release of them is averaged with the earlier ones by inverse variance
  (kept in memory: a resumed run starts averaging afresh, which costs accuracy, not privacy);
- the noisy counts shrink the factors of rarely seen ads (ALSSettings.count_shrinkage),
  towards zero or (als-catalog-prior) towards the mean factors of their public catalog tags.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from server.reply_bounds import als_violations, median_clip
from shared.als import ALSSettings, ads_statistics_counts, check_statistics, own_factor_weights, solve_ads
from shared.app_log import log
from shared.privacy_policy import DEFAULT_MAX_USERS
from shared.wire import ALS_COUNT, ALS_POSITIVES, Arrays, PrivacyReport, TrainReply, to_array_record

ROUND_INVARIANT = (ALS_POSITIVES, ALS_COUNT)
ADS_ON_PRIOR = "als-ads-on-prior"  # share of ads whose own factors weigh under half (count shrinkage)


class ALSAggregation(FedAvg):
    needs_weights = False  # statistics are summed: a reply carries no count of users (under DP it must not)

    def __init__(
        self, settings: ALSSettings, num_ads: int, dim: int, tags: np.ndarray | None = None,
        max_users: int = DEFAULT_MAX_USERS, robust_factor: float | None = None, **fedavg_args: Any,
    ) -> None:
        super().__init__(**fedavg_args)
        self.settings, self.num_ads, self.dim, self.tags = settings, num_ads, dim, tags
        self.max_users, self.robust_factor = max_users, robust_factor
        # running inverse-variance average of the round-invariant statistics: (value, variance)
        self._counts: dict[str, tuple[np.ndarray, float]] = {}

    def check_reply(self, arrays: Arrays, metrics: dict[str, float]) -> None:
        """The keys, shapes and finiteness, then the protocol's bounds (server/reply_bounds.py)."""
        check_statistics(arrays, self.settings, self.num_ads, self.dim)
        privacy = PrivacyReport.from_metrics(metrics)
        problems = als_violations(arrays, self.settings, self.max_users, privacy.noise_multiplier if privacy else 0.0)
        if problems:
            raise ValueError("; ".join(problems))

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
        metrics = []
        if self.robust_factor is not None:  # the median needs every reply at once
            replies_in = [TrainReply.from_message(msg) for msg in valid]
            metrics = [reply.metric_record() for reply in replies_in]
            for arrays in median_clip([reply.arrays for reply in replies_in], self.robust_factor):
                _accumulate(total, arrays)
        else:  # one reply's arrays at a time: no copy of every reply beside the messages
            for msg in valid:
                reply = TrainReply.from_message(msg)
                metrics.append(reply.metric_record())
                _accumulate(total, reply.arrays)
        return self.solve(total, metrics)

    def solve(self, total: Arrays, metrics: list[dict[str, float]]) -> tuple[ArrayRecord, MetricRecord]:
        """The ads from the summed statistics of the releases whose metrics are `metrics` (the
        plain path's sum, or the secure path's unmasked one: server/secure_round.py)."""
        # each release's noise multiplier is public (a function of its merchant's budget plan)
        reports = [PrivacyReport.from_metrics(record) for record in metrics]
        stds = self.settings.summed_noise_stds([report.noise_multiplier for report in reports if report])
        variances = {key: stds[key] ** 2 for key in total}
        for key in ROUND_INVARIANT:
            if key in total:
                total[key], variances[key] = self._average_counts(key, total[key], variances[key])
        stds = {key: float(np.sqrt(v)) for key, v in variances.items()}
        arrays = solve_ads(total, self.settings, stds, self.tags)
        record = _mean_metrics(metrics)
        weights = own_factor_weights(ads_statistics_counts(total, self.settings), self.settings, stds)
        if weights is not None:
            # how much of the model is popularity: an ad whose noisy count is below kappa noise
            # stds keeps under half its own factors, and its score is mostly its bias (or prior)
            on_prior = float(np.mean(weights < 0.5))
            record[ADS_ON_PRIOR] = on_prior
            if on_prior > 0.5:
                log.warning("private ALS: %.0f%% of the ads are seen by fewer users than the noise in their counts: "
                            "for them the model ranks by (noisy) popularity%s", 100 * on_prior,
                            " and their catalog tags" if self.tags is not None else "")
        return to_array_record(arrays), record

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
