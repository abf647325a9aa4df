"""Biased matrix factorization for implicit feedback, split along the privacy boundary.

score(u, a) = p_u . q_a + b_a

- `AdModel` holds the global, released parameters: ad factors q and ad biases b (separate
  embeddings, so Opacus' ghost clipping accepts them). It takes user vectors as *input*: user
  factors are client-side data, never module parameters, so nothing in an optimizer that
  releases parameters ever touches them.
- `solve_user_factors` computes the user factors exactly (Newton's method on the L2-regularized
  logistic loss) from a user's own rows and the frozen global parameters: the joint-DP user step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared.params import check_global_arrays, mf_shapes
from shared.wire import AD_BIAS, AD_FACTORS


class AdModel(nn.Module):
    def __init__(self, num_ads: int, dim: int) -> None:
        super().__init__()
        self.ad_factors = nn.Embedding(num_ads, dim)
        self.ad_bias = nn.Embedding(num_ads, 1)

    @property
    def num_ads(self) -> int:
        return self.ad_factors.num_embeddings

    @property
    def dim(self) -> int:
        return self.ad_factors.embedding_dim

    def forward(self, user_vectors: torch.Tensor, ads: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] of user_vectors [B, k] against ads [B, L]."""
        return torch.einsum("bk,blk->bl", user_vectors, self.ad_factors(ads)) + self.ad_bias(ads).squeeze(-1)

    def get_arrays(self) -> dict[str, np.ndarray]:
        return {
            AD_FACTORS: self.ad_factors.weight.detach().cpu().numpy().copy(),
            AD_BIAS: self.ad_bias.weight.detach().cpu().numpy()[:, 0].copy(),
        }

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        check_global_arrays(arrays, mf_shapes(self.num_ads, self.dim))
        with torch.no_grad():
            self.ad_factors.weight.copy_(torch.as_tensor(arrays[AD_FACTORS], dtype=torch.float32))
            self.ad_bias.weight.copy_(torch.as_tensor(arrays[AD_BIAS], dtype=torch.float32)[:, None])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AdModel:
        num_ads, dim = arrays[AD_FACTORS].shape
        model = cls(num_ads, dim)
        model.set_arrays(arrays)
        return model


@torch.no_grad()
def solve_user_factors(
    ad_factors: torch.Tensor,
    ad_bias: torch.Tensor,
    ads: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    l2: float,
    iters: int,
    init: torch.Tensor | None = None,
    chunk_rows: int = 1 << 17,
) -> torch.Tensor:
    """argmin_p  sum_l mask * BCE(p . q_l + b_l, y_l) + l2/2 ||p||^2, per user, by Newton's method.

    ads, labels, mask: [U, L] (padded). Returns [U, k]. The objective is strictly convex
    (l2 > 0); damped Newton (backtracking on the objective) converges from any start, and
    `init` (last round's factors) saves iterations. Users are solved in chunks of similar row counts so the gathered ad factors
    stay near the size of the real rows, not of the padding.
    """
    num_users, dim = ads.shape[0], ad_factors.shape[1]
    out = torch.zeros(num_users, dim, dtype=ad_factors.dtype)
    if init is not None:
        out.copy_(init)
    # width a user needs: up to its last real row (real rows need not be contiguous)
    columns = torch.arange(1, mask.shape[1] + 1).expand_as(mask)
    lengths = (columns * mask).amax(dim=1) if mask.shape[1] else torch.zeros(num_users, dtype=torch.long)
    order = torch.argsort(lengths, descending=True)
    start = 0
    while start < num_users:
        width = max(int(lengths[order[start]]), 1)
        size = max(1, chunk_rows // width)
        users = order[start : start + size]
        out[users] = _newton(
            ad_factors, ad_bias, ads[users, :width], labels[users, :width], mask[users, :width], l2, iters, out[users]
        )
        start += size
    return out


def _objective(p: torch.Tensor, q: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, m: torch.Tensor, l2: float) -> torch.Tensor:
    s = torch.einsum("uk,ulk->ul", p, q) + b
    data = (torch.nn.functional.softplus(s) - labels * s) * m
    return data.sum(dim=1) + 0.5 * l2 * p.pow(2).sum(dim=1)


def _newton(
    ad_factors: torch.Tensor, ad_bias: torch.Tensor, ads: torch.Tensor, labels: torch.Tensor,
    mask: torch.Tensor, l2: float, iters: int, p: torch.Tensor, max_halvings: int = 20,
) -> torch.Tensor:
    """Damped Newton: a full step where it decreases the objective, else halved (Armijo)."""
    q = ad_factors[ads]  # [U, L, k]
    b = ad_bias[ads]  # [U, L]
    m = mask.to(q.dtype)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    value = _objective(p, q, b, labels, m, l2)
    for _ in range(iters):
        s = torch.einsum("uk,ulk->ul", p, q) + b
        sig = torch.sigmoid(s)
        grad = torch.einsum("ul,ulk->uk", (sig - labels) * m, q) + l2 * p
        weights = (sig * (1 - sig) * m).unsqueeze(-1)
        hessian = torch.bmm((q * weights).transpose(1, 2), q) + l2 * eye
        direction = torch.linalg.solve(hessian, grad)
        decrease = (grad * direction).sum(dim=1)  # > 0: the Hessian is positive definite
        step = torch.ones(p.shape[0], dtype=q.dtype)
        for _ in range(max_halvings):
            candidate = p - step[:, None] * direction
            new_value = _objective(candidate, q, b, labels, m, l2)
            failed = new_value > value - 1e-4 * step * decrease
            if not failed.any():
                break
            step = torch.where(failed, step / 2, step)
        accept = new_value <= value
        p = torch.where(accept[:, None], candidate, p)
        value = torch.where(accept, new_value, value)
    return p
