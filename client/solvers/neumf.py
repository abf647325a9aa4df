"""NeuMF (mf-solver = "neumf"): neural CF with GMF and MLP towers (shared/neumf.py), trained as SGD is.

User step: each user's two embeddings by Adam on their own rows, global parameters frozen
(client/user_step.NeuMFUserStep; local, never released). Local update: SGD's epochs of Adam over
mini-batches of users on every global parameter (ad embeddings, towers, output layer), which the
server averages (FedAvg). Under DP the same plan as SGD's, DP-SGD with one Opacus sample = one
user (client/privacy/dp_sgd.py); Opacus computes the per-user gradients or norms of the whole
network (hooks or ghost clipping), as MF's closed form does not apply.
"""

from __future__ import annotations

import torch

from client.solvers.sgd import SGDSolver
from client.user_step import NeuMFUserStep
from shared.neumf import NeuMF
from shared.wire import Arrays


class NeuMFSolver(SGDSolver):
    name = "neumf"

    def build_model(self, arrays: Arrays) -> torch.nn.Module:
        return NeuMF.from_arrays(arrays)

    def touched_penalty(self, model: torch.nn.Module, ads: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, NeuMF)
        gmf, mlp = model.ad_embeddings(ads)
        return gmf.pow(2).sum(-1) + mlp.pow(2).sum(-1) + model.ad_bias(ads).squeeze(-1).pow(2)

    def user_step(self) -> NeuMFUserStep:  # type: ignore[override]
        return NeuMFUserStep.from_config(self.cfg)
