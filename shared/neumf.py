"""NeuMF as a torch module over the global parameters only (shared/neumf_arrays.py has the maths).

As MF's `AdModel`, it takes the user vectors [p_g, p_m] as *input*: they are the merchant's
data, never module parameters, so nothing an optimizer releases touches them. One forward pass
scores each user's own rows ([B, L] ads), and every layer sees the user as its batch dimension:
Opacus' per-sample gradients (hooks) and per-sample norms (ghost clipping) of nn.Embedding and
nn.Linear then bound each user's whole contribution, the MLP tower's included.

`solve_neumf_users` is NeuMF's user step: each user's embeddings fitted to their own rows with
every global parameter frozen (Adam on a per-user objective; exact, local, never released).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.neumf_arrays import content_width, layer_bias, layer_weight, layer_widths
from shared.params import check_global_arrays
from shared.wire import (
    AD_BIAS,
    NEUMF_CONTENT,
    NEUMF_CONTENT_GMF,
    NEUMF_CONTENT_MLP,
    NEUMF_GMF,
    NEUMF_MLP,
    NEUMF_OUTPUT_BIAS,
    NEUMF_OUTPUT_WEIGHT,
    Arrays,
)


class NeuMF(nn.Module):
    ad_content: torch.Tensor  # [ads, content_dim] buffer, with the content tower only

    def __init__(self, num_ads: int, dim: int, layers: tuple[int, ...], content_dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.ad_gmf = nn.Embedding(num_ads, dim)
        self.ad_mlp = nn.Embedding(num_ads, dim)
        self.ad_bias = nn.Embedding(num_ads, 1)
        widths = (2 * dim, *layers)
        self.layers = [nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
        self.mlp = nn.ModuleList(self.layers)
        self.output = nn.Linear(dim + widths[-1], 1)
        self.content_gmf: nn.Linear | None = None
        self.content_mlp: nn.Linear | None = None
        if content_dim:
            # public and fixed: a buffer, so no optimizer (and no DP noise) ever moves it
            self.register_buffer("ad_content", torch.zeros(num_ads, content_dim))
            self.content_gmf = nn.Linear(content_dim, dim, bias=False)
            self.content_mlp = nn.Linear(content_dim, dim, bias=False)

    @property
    def num_ads(self) -> int:
        return self.ad_gmf.num_embeddings

    def ad_embeddings(self, ads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gmf, mlp = self.ad_gmf(ads), self.ad_mlp(ads)
        if self.content_gmf is not None and self.content_mlp is not None:
            content = self.ad_content[ads]
            gmf, mlp = gmf + self.content_gmf(content), mlp + self.content_mlp(content)
        return gmf, mlp

    def forward(self, user_vectors: torch.Tensor, ads: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] of user_vectors [B, 2 x dim] against ads [B, L]."""
        gmf_users, mlp_users = user_vectors[:, : self.dim], user_vectors[:, self.dim :]
        gmf_ads, mlp_ads = self.ad_embeddings(ads)
        hidden = torch.cat([mlp_users.unsqueeze(1).expand(-1, ads.shape[1], -1), mlp_ads], dim=-1)
        for layer in self.layers:
            hidden = F.relu(layer(hidden))
        fused = torch.cat([gmf_users.unsqueeze(1) * gmf_ads, hidden], dim=-1)
        return self.output(fused).squeeze(-1) + self.ad_bias(ads).squeeze(-1)

    def _named_arrays(self) -> dict[str, torch.Tensor]:
        named = {NEUMF_GMF: self.ad_gmf.weight, NEUMF_MLP: self.ad_mlp.weight, AD_BIAS: self.ad_bias.weight[:, 0],
                 NEUMF_OUTPUT_WEIGHT: self.output.weight, NEUMF_OUTPUT_BIAS: self.output.bias}
        for index, layer in enumerate(self.layers):
            named[layer_weight(index)], named[layer_bias(index)] = layer.weight, layer.bias
        if self.content_gmf is not None and self.content_mlp is not None:
            named[NEUMF_CONTENT], named[NEUMF_CONTENT_GMF], named[NEUMF_CONTENT_MLP] = (
                self.ad_content, self.content_gmf.weight, self.content_mlp.weight)
        return named

    def get_arrays(self) -> dict[str, np.ndarray]:
        return {key: value.detach().cpu().numpy().copy() for key, value in self._named_arrays().items()}

    def set_arrays(self, arrays: Arrays) -> None:
        named = self._named_arrays()
        check_global_arrays(arrays, {key: tuple(value.shape) for key, value in named.items()})
        with torch.no_grad():
            for key, value in named.items():
                value.copy_(torch.as_tensor(arrays[key], dtype=torch.float32))

    @classmethod
    def from_arrays(cls, arrays: Arrays) -> NeuMF:
        num_ads, dim = arrays[NEUMF_GMF].shape
        model = cls(num_ads, dim, layer_widths(arrays), content_width(arrays))
        model.set_arrays(arrays)
        return model


def solve_neumf_users(
    model: NeuMF, user: torch.Tensor, ads: torch.Tensor, labels: torch.Tensor, num_users: int,
    l2: float, steps: int, learning_rate: float, init: torch.Tensor | None = None,
) -> torch.Tensor:
    """argmin_p  sum over each user's rows of BCE(score(p_u, a), y) + l2/2 ||p_u||^2, by Adam.

    Rows come flat (row i: `user[i]`, `ads[i]`, `labels[i]`), so no user pays for another's
    padding. The objective is a sum of per-user terms and Adam's updates are per coordinate: a
    user's result depends on their own rows alone, whoever else is present. The first MLP layer
    is folded into a per-user and a per-ad term (shared/neumf_arrays.py), so a step costs only the
    later layers per row. NeuMF's objective is not convex in p: this is a local optimum from
    `init` (last round's embeddings; zeros for a new user)."""
    dim = model.dim
    with torch.no_grad():
        gmf_ads, mlp_ads = model.ad_embeddings(torch.arange(model.num_ads))
        first = model.layers[0]
        ad_part = mlp_ads @ first.weight[:, dim:].T  # [A, h1]
        output = model.output.weight[0]
        row_gmf = gmf_ads[ads] * output[:dim]  # [N, d]
        row_ad_part, row_bias = ad_part[ads], model.ad_bias.weight[ads, 0] + model.output.bias[0]
    vectors = torch.zeros(num_users, 2 * dim) if init is None else init.detach().clone().float()
    vectors.requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        rows = vectors[user]
        hidden = F.relu(rows[:, dim:] @ first.weight[:, :dim].T.detach() + first.bias.detach() + row_ad_part)
        for layer in model.layers[1:]:
            hidden = F.relu(F.linear(hidden, layer.weight.detach(), layer.bias.detach()))
        logits = (rows[:, :dim] * row_gmf).sum(dim=1) + hidden @ output[dim:].detach() + row_bias
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") + 0.5 * l2 * vectors.pow(2).sum()
        loss.backward()
        optimizer.step()
    return vectors.detach()
