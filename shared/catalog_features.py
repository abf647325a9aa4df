"""What the public catalog says about each ad, as weighted tag features (numpy only).

The catalog warm start (`init = "catalog"`) and the catalog prior of private ALS
(`als-catalog-prior`) lean on the ads' public tags (category, brand, attributes, genres). A tag
tells ads apart only if some ads carry it and others do not: a tag on every ad (a catalog
with one category, every Beauty item marked "unknown") says nothing, and one on a single ad
is that ad's own id. Each tag is weighted by its inverse document frequency, log(ads / ads
with the tag): zero for a tag carried by every ad, largest for the rarest. A tag carried by
one ad only is dropped too: a direction or prior of its own would make no ad lean on any
other.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from shared.app_log import log
from shared.data.schema import AdCatalog


def tag_weights(membership: np.ndarray | sp.csr_array) -> np.ndarray:
    """Inverse document frequency per tag column of a [ads, tags] 0/1 matrix (dense or sparse); 0
    for a tag that every ad carries or only one ad does (neither relates one ad to another)."""
    carriers = np.asarray(membership.sum(axis=0)).ravel()
    shared_by_some = (carriers >= 2) & (carriers < membership.shape[0])
    weights = np.zeros(membership.shape[1])
    weights[shared_by_some] = np.log(membership.shape[0] / carriers[shared_by_some])
    return weights


def informative_tags(catalog: AdCatalog, purpose: str) -> np.ndarray:
    """[ads, informative tags]: the membership matrix, each column scaled by its weight, the
    uninformative columns removed. Warns (naming `purpose`) when no tag is left or when some
    ads carry none: those ads get nothing from the catalog."""
    membership = catalog.tag_membership()
    weights = tag_weights(membership)
    features = membership[:, weights > 0] * weights[weights > 0]
    _warn_about_bare_ads(catalog, purpose, features.shape[1], int((features.sum(axis=1) == 0).sum()))
    return features


def _warn_about_bare_ads(catalog: AdCatalog, purpose: str, informative: int, bare: int) -> None:
    """Say it when the catalog gives `purpose` nothing, or nothing for some ads."""
    if informative == 0:
        log.warning("%s: the catalog %s has no informative tag (every tag is on every ad or on one ad only): "
                    "it gives the %s nothing to work with", purpose, catalog.source, purpose)
    elif bare:
        log.warning("%s: %d of %d ads in %s carry no informative tag: the %s cannot place them",
                    purpose, bare, len(catalog), catalog.source, purpose)


def normalized_tag_features(catalog: AdCatalog, purpose: str = "content affinity") -> sp.csr_array:
    """[ads, tags] sparse: each ad's informative tags (weighted as in `informative_tags`), its row
    scaled to unit L2 norm (an ad with many tags weighs no more than one with few); an ad without
    an informative tag has an empty row, and the warning `informative_tags` gives counts it (a
    user's tags cannot score such an ad). Sparse: a million-ad catalog has a few tags per ad."""
    membership = catalog.sparse_tag_membership()
    weights = tag_weights(membership)
    keep = np.flatnonzero(weights > 0)
    features = sp.csr_array(membership[:, keep] @ sp.diags_array(weights[keep]))
    norms = np.sqrt(np.asarray(features.multiply(features).sum(axis=1)).ravel())
    _warn_about_bare_ads(catalog, purpose, len(keep), int((norms == 0).sum()))
    return sp.csr_array(sp.diags_array(1.0 / np.where(norms > 0, norms, 1.0)) @ features)
