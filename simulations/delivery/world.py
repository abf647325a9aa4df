"""How the simulated users of the synthetic market respond to the ads they are shown.

The synthetic generator (shared/data/synthetic.py) knows each user's taste and each ad's hidden
vector and popularity: the very quantities its logs were drawn from. A slate of K ads shown to a
user is answered by a cascade-free position-based click model (Richardson et al. 2007; Craswell
et al. 2008): the user examines position k with probability 1 / (k + 1)^eta and clicks an
examined ad with probability sigmoid(attraction), where the attraction is the generator's own
click logit (taste_strength x taste . ad + popularity logit) plus an offset that sets the base
rate and per-impression Gaussian noise. A click becomes a purchase with probability
sigmoid(purchase offset + purchase taste weight x taste . ad): purchases follow taste, not
popularity. Each ad has a price (a fixed log-normal draw per ad), the revenue of a purchase.

Randomness: each user's answers draw from a generator seeded by (world seed, round, user id):
what one user does never depends on which other users were served, or in what order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shared.data.synthetic import GroundTruth
from simulations.delivery.settings import ResponseSettings


@dataclass(frozen=True)
class Responses:
    """One user's answers to one slate, position by position."""

    ads: np.ndarray  # int64 [K] catalog rows, in slate order
    clicked: np.ndarray  # bool [K]
    purchased: np.ndarray  # bool [K], only where clicked
    revenue: np.ndarray  # float64 [K], the price where purchased


def user_stream(seed: int, server_round: int, user_id: str) -> np.random.Generator:
    """A user's own generator for a round: independent of every other user's."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, server_round, int.from_bytes(digest, "little")])


class SimulatedUsers:
    """The synthetic market's users, answering slates from the generator's ground truth."""

    def __init__(self, truth: GroundTruth, settings: ResponseSettings, seed: int) -> None:
        self.truth = truth
        self.settings = settings
        self.seed = seed
        price_rng = np.random.default_rng([seed, 3])
        self.prices = np.exp(settings.mean_log_price + settings.log_price_std * price_rng.standard_normal(len(truth.ad_vectors)))

    def affinity(self, user_id: str, ads: np.ndarray) -> np.ndarray:
        """taste . ad of the user for `ads` (cosine: both are unit vectors)."""
        return self.truth.ad_vectors[ads] @ self.truth.user_taste[user_id]

    def click_probability(self, user_id: str, ads: np.ndarray) -> np.ndarray:
        """P(click) of each ad at its slate position, before the per-impression noise."""
        return self.examination(len(ads)) * _sigmoid(self._attraction_logit(user_id, ads))

    def examination(self, slate_size: int) -> np.ndarray:
        return 1.0 / np.arange(1, slate_size + 1, dtype=np.float64) ** self.settings.position_bias

    def expected_clicks(self, user_id: str, ads: np.ndarray) -> float:
        """The slate's expected clicks without noise: what an oracle policy maximizes."""
        return float(self.click_probability(user_id, ads).sum())

    def respond(self, user_id: str, ads: np.ndarray, server_round: int) -> Responses:
        rng = user_stream(self.seed, server_round, user_id)
        s = self.settings
        logit = self._attraction_logit(user_id, ads) + s.click_noise * rng.standard_normal(len(ads))
        examined = rng.random(len(ads)) < self.examination(len(ads))
        clicked = examined & (rng.random(len(ads)) < _sigmoid(logit))
        buy_logit = s.purchase_offset + s.purchase_taste * self.affinity(user_id, ads)
        purchased = clicked & (rng.random(len(ads)) < _sigmoid(buy_logit))
        return Responses(ads=ads, clicked=clicked, purchased=purchased, revenue=np.where(purchased, self.prices[ads], 0.0))

    def _attraction_logit(self, user_id: str, ads: np.ndarray) -> np.ndarray:
        t = self.truth
        return t.taste_strength * self.affinity(user_id, ads) + t.ad_popularity_logit[ads] + self.settings.click_offset


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))
