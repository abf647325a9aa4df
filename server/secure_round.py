"""The server's side of secure aggregation: one training round through Flower's SecAgg+.

The round's sampled merchants (the strategy's configure_train) are asked through Flower's
SecAggPlusWorkflow (shared/flower_internals.py `secure_mean`): setup, key sharing, collection
of masked vectors, unmasking. The server learns the mean of the scaled releases of the merchants
whose vectors reached the unmasking, and how many they are; it multiplies the mean back into
the statistics' sum (shared/secure_sum.py), checks the sum against what that many merchants can
produce (server/reply_bounds.py: a sum, not a reply, is all there is to check) and solves the ads.

Per round it records who was asked, who contributed, who failed or refused at which stage and
why, and the sum's guarantee: the threshold (every unmasked sum holds at least that many
releases), the contributors, and the noise multiplier the sum carries (each contributor's
reported share added up), so a dropout shows as a smaller sum with the noise of its survivors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid

from server.reply_bounds import als_violations
from shared import flower_internals
from shared.als import ALSSettings
from shared.flower_internals import SecureSumSettings
from shared.secure_sum import ARRAY_KEYS, CLIPPING_RANGE, MAX_MERCHANTS, MODULUS_RANGE, QUANTIZATION_RANGE, SecureScales
from shared.wire import ALS_RELEASE, DP_NOISE_MULTIPLIER, METRICS, SERVER_ROUND, STATISTICS, Arrays, plain_metrics

STAGES = ("setup", "share-keys", "collect", "unmask")


@dataclass
class SecureOutcome:
    """One secure exchange: the statistics' sum (None: the protocol halted), the collect-stage
    replies of the contributors and every error reply, by stage."""

    total: Arrays | None
    contributions: list[Message]
    errors: list[tuple[str, Message]]
    threshold: int | None
    asked: list[int]


class SecureTraining:
    def __init__(self, settings: ALSSettings, max_users: int, threshold: float, timeout: float, context: Context) -> None:
        self.settings, self.max_users = settings, max_users
        self.release = STATISTICS  # what the exchange under way asks for (shared/als.py)
        self.protocol = SecureSumSettings(threshold=threshold, clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
                                          modulus_range=MODULUS_RANGE, timeout=timeout)
        self.context = context

    @property
    def scales(self) -> SecureScales:
        """The public scales of the release under way's statistics."""
        return SecureScales.for_release(self.settings, list(self.settings.release_keys(self.release)), self.max_users)

    def exchange(self, grid: Grid, server_round: int, arrays: Arrays, node_ids: list[int], release: str = STATISTICS) -> SecureOutcome:
        if len(node_ids) > MAX_MERCHANTS:
            raise ValueError(f"secure aggregation sums at most {MAX_MERCHANTS} merchants without overflow, not {len(node_ids)}")
        self.release = release
        keys = sorted(arrays)
        result = flower_internals.secure_mean(
            grid, self.context, server_round, node_ids, [arrays[key] for key in keys],
            {SERVER_ROUND: server_round, ARRAY_KEYS: ",".join(keys), ALS_RELEASE: release}, self.protocol,
        )
        errors = [(stage, msg) for stage, replies in zip(STAGES, result.stage_replies) for msg in replies if msg.has_error()]
        collected = result.stage_replies[2] if len(result.stage_replies) > 2 else []
        contributors = set(result.contributors)
        contributions = [msg for msg in collected if not msg.has_error() and msg.metadata.src_node_id in contributors]
        total = None if result.mean is None else self.scales.from_mean(result.mean, len(contributions))
        return SecureOutcome(total, contributions, errors, result.threshold, list(node_ids))

    def check_sum(self, total: Arrays, guarantee: dict[str, Any]) -> list[str]:
        """The unmasked sum against what that many merchants can produce (server/reply_bounds.py):
        a sum is all there is to check."""
        not_finite = [f"{key} is not finite" for key, value in total.items() if not np.all(np.isfinite(value))]
        return not_finite or als_violations(total, self.settings, self.max_users * max(int(guarantee["contributors"]), 1),
                                            float(guarantee["sum_noise_multiplier"]), self.release)

    def sum_noise(self, outcome: SecureOutcome) -> dict[str, float]:
        """Per statistic, the noise std of the unmasked sum: the contributors' shares added up."""
        return self.settings.summed_noise_stds(_noise_shares(outcome), self.release)

    def guarantee(self, outcome: SecureOutcome) -> dict[str, Any]:
        """What the round's sum carries, for its history record."""
        shares = _noise_shares(outcome)
        error = self.scales.quantization_error(max(len(outcome.contributions), 1))
        noise = self.sum_noise(outcome)
        return {
            "threshold": outcome.threshold, "contributors": len(outcome.contributions), "asked": len(outcome.asked),
            # the sum's noise multiplier: the contributors' shares of variance added up
            "sum_noise_multiplier": float(math.sqrt(sum(s**2 for s in shares))),
            # the quantization's std (at most) against the DP noise's, the largest over the statistics
            "quantization_to_noise": max((error[key][1] / noise[key] for key in noise if noise[key] > 0), default=math.inf),
        }


def _noise_shares(outcome: SecureOutcome) -> list[float]:
    """The noise multiplier each contributor reports for the noise its release carries."""
    return [plain_metrics(msg.content.metric_records.get(METRICS)).get(DP_NOISE_MULTIPLIER, 0.0) for msg in outcome.contributions]
