"""Slate policies a merchant can serve with, and the exploration that wraps them.

Every policy scores every ad for a batch of the merchant's users; `choose_slate` turns a user's
scores into a slate of K ads: the best K the user has not already clicked or bought, with a
share of positions given to exploration (epsilon-greedy: each position is, with probability
epsilon, a uniformly drawn ad instead), so that a model also sees what it would not have shown.

- federated: the global ad parameters and the merchant's own user factors (the model under test),
  ranked as a merchant serves them (client/node_data.NodeData.score_fn: with the run's content affinity);
- local-only: the same solver trained by the merchant alone on its own logs, never federated, ranked alike;
- popularity: the merchant's own click and purchase counts;
- random: a uniform draw.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]  # user rows of the merchant -> [users, ads] scores


def popularity_scores(positive_ads: np.ndarray, num_ads: int) -> ScoreFn:
    """Every user gets the merchant's own counts of users who clicked or bought each ad."""
    counts = np.bincount(positive_ads, minlength=num_ads).astype(np.float64)
    return lambda users: np.broadcast_to(counts, (len(users), num_ads))


def random_scores(num_ads: int) -> ScoreFn:
    """Every ad ties: choose_slate breaks ties with the user's own draw, a uniform slate."""
    return lambda users: np.zeros((len(users), num_ads))


def choose_slate(scores: np.ndarray, excluded: np.ndarray, slate_size: int, exploration: float, rng: np.random.Generator) -> np.ndarray:
    """K catalog rows for one user, best first, none of them in `excluded` (a bool mask of the
    user's clicked or bought ads); each position is, with probability `exploration`, an ad
    drawn uniformly from the rest of the allowed ads instead (the slate never repeats an ad)."""
    allowed = np.flatnonzero(~excluded)
    size = min(slate_size, len(allowed))
    # ties (popularity, equal scores) go to a random order rather than to the lowest row
    jitter = rng.random(len(allowed))
    best = allowed[np.lexsort((jitter, -scores[allowed]))[:size]]
    if exploration <= 0:
        return best
    slate = best.copy()
    explore = rng.random(size) < exploration
    if explore.any():
        pool = np.setdiff1d(allowed, best[~explore])
        slate[explore] = rng.choice(pool, size=int(explore.sum()), replace=False)
    return slate
