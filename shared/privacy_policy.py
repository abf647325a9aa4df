"""A merchant's privacy policy: how much privacy it gives, whatever a run asks for.

The run config is the operator's request, and the operator is an adversary too: it decides
nothing here. A deployed merchant pins its policy in its own node config (shared/node_config.py)
when it starts its SuperNode; a merchant that pins nothing gets the private default below. A run
that asks for less privacy than the policy allows is refused before any data is read.

In a simulation the data scientist is the operator and every merchant at once, so a simulated
node takes its policy from the run it is asked to do (`for_simulation`): a simulation path,
never a deployed one (a SuperNode's node config names its own data, never a partition).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.config import RunConfig

DEFAULT_DELTA = 1e-6  # public: far below 1 / users of any merchant of up to DEFAULT_MAX_USERS
DEFAULT_MAX_USERS = 100_000
Solver = Literal["als", "sgd", "neumf"]
SOLVERS: tuple[Solver, ...] = ("als", "sgd", "neumf")


class PolicyViolation(ValueError):
    """A run asks for less privacy than the merchant's policy gives; the message says what."""


class PrivacyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["user", "none"] = "user"  # user: user-level DP is required; none: the merchant makes no DP claim
    max_epsilon: float = Field(8.0, gt=0)  # the most its ledger may ever spend
    delta: float = Field(DEFAULT_DELTA, gt=0, lt=1)  # public, so the epsilon it reports is a function of public values
    # a public upper bound on the merchant's users: delta must stay below 1 / it. Checked here,
    # on public values, never against the actual count (a refusal that depends on it would leak it)
    max_users: int = Field(DEFAULT_MAX_USERS, ge=1)
    metrics: Literal["noised", "none"] = "noised"  # how evaluation metrics may leave under DP
    solvers: tuple[Solver, ...] = SOLVERS
    # secure aggregation (docs/PRIVACY.md): allow it, require it, or refuse it; and how many other
    # merchants may collude with the server (each release then carries noise for threshold - colluders)
    secure_aggregation: Literal["allow", "require", "refuse"] = "refuse"
    secure_colluders: int = Field(0, ge=0)

    @field_validator("solvers")
    @classmethod
    def _some(cls, solvers: tuple[str, ...]) -> tuple[str, ...]:
        if not solvers:
            raise ValueError("at least one solver")
        return solvers

    @model_validator(mode="after")
    def _delta_below_one_over_users(self) -> PrivacyPolicy:
        if self.delta * self.max_users >= 1:
            raise ValueError(f"delta {self.delta:g} is not below 1 / max-users ({self.max_users}): "
                             "it could let one of that many users be revealed outright")
        return self

    @classmethod
    def for_simulation(cls, cfg: RunConfig) -> PrivacyPolicy:
        """A simulated merchant gives exactly the privacy its run asks for (PolicyViolation when
        that is no valid policy, e.g. a delta not below 1 / max-users)."""
        try:
            return cls(mode="user" if cfg.privacy == "user" else "none", max_epsilon=cfg.target_epsilon,
                       delta=cfg.target_delta or DEFAULT_DELTA, metrics=cfg.dp_metrics, solvers=(cfg.mf_solver,),
                       secure_aggregation="require" if cfg.secure_aggregation else "allow")
        except ValidationError as exc:
            raise PolicyViolation(validation_reasons(exc)) from None

    def delta_for(self, cfg: RunConfig) -> float:
        """The delta of a run: the policy's, or a smaller one the run asks for."""
        return min(cfg.target_delta, self.delta) if cfg.target_delta else self.delta

    def admit(self, cfg: RunConfig) -> None:
        """Raises PolicyViolation when `cfg` asks for less privacy than this policy gives."""
        if cfg.mf_solver not in self.solvers:
            raise PolicyViolation(f"the merchant's policy trains with {', '.join(self.solvers)}, not mf-solver '{cfg.mf_solver}'")
        if self.mode == "none":
            return
        if cfg.privacy != "user":
            raise PolicyViolation(f"the merchant's policy requires user-level DP; the run asks for privacy = '{cfg.privacy}'")
        if cfg.target_epsilon > self.max_epsilon:
            raise PolicyViolation(f"the run asks for epsilon {cfg.target_epsilon:g}, the merchant's policy allows at most {self.max_epsilon:g}")
        if cfg.target_delta > self.delta:
            raise PolicyViolation(f"the run asks for delta {cfg.target_delta:g}, the merchant's policy allows at most {self.delta:g}")
        if self.metrics == "none" and cfg.dp_metrics != "none":
            raise PolicyViolation(f"the merchant's policy releases no evaluation metrics; the run asks for dp-metrics = '{cfg.dp_metrics}'")
        if self.secure_aggregation == "refuse" and cfg.secure_aggregation:
            raise PolicyViolation("the merchant's policy refuses secure aggregation (its releases leave with the full noise)")
        if self.secure_aggregation == "require" and not cfg.secure_aggregation:
            raise PolicyViolation("the merchant's policy requires secure aggregation; the run asks for secure-aggregation = false")

    def secure_noise_share(self, threshold: int) -> float:
        """The share of a release's noise variance this merchant adds under secure aggregation:
        every sum the server can unmask holds at least `threshold` releases, of which up to
        `secure_colluders` may be the server's accomplices' (who know their own noise), so
        1 / (threshold - colluders). PolicyViolation when that leaves no honest merchant."""
        honest = threshold - self.secure_colluders
        if honest < 1:
            raise PolicyViolation(f"the secure sum's threshold {threshold} is not above the {self.secure_colluders} merchants the policy "
                                  "allows to collude with the server")
        return 1.0 / honest

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "max_epsilon": self.max_epsilon, "delta": self.delta, "max_users": self.max_users,
                "metrics": self.metrics, "solvers": list(self.solvers), "secure_aggregation": self.secure_aggregation,
                "secure_colluders": self.secure_colluders}


def validation_reasons(exc: ValidationError) -> str:
    """The reasons of a failed validation, without pydantic's "Value error, " prefixes."""
    return "; ".join(str(error.get("ctx", {}).get("error", error["msg"])) for error in exc.errors())
