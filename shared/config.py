"""The run configuration: typed, validated once where it enters (ServerApp and ClientApp).

Flower hands over `[tool.flwr.app.config]` of pyproject.toml, merged with `flwr run -c`
overrides, as a flat dict with dashed keys. `RunConfig.from_flower` turns it into this model;
a bad value raises `ConfigError` naming the key and where the value came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RUN_CONFIG_SOURCE = "pyproject.toml [tool.flwr.app.config] (or a `flwr run -c` override)"


class ConfigError(ValueError):
    pass


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  field '{key}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


DATA_FIELDS = (
    "dataset", "data_path", "catalog_path", "partitioning", "dirichlet_alpha", "seed",
    "synthetic_merchants", "synthetic_users", "synthetic_ads", "synthetic_categories",
)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True)

    # outputs and state
    output_dir: str = "outputs/default"
    state_dir: str = "outputs/default/state"
    resume: bool = False
    # rounds and sampling
    num_rounds: int = Field(10, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_nodes: int = Field(2, ge=1)
    # data
    dataset: Literal["synthetic", "movielens-100k", "amazon-seq", "logs"] = "synthetic"
    data_path: str = ""
    catalog_path: str = ""
    partitioning: Literal["merchant", "region", "iid", "dirichlet"] = "merchant"
    dirichlet_alpha: float = Field(0.5, gt=0)
    seed: int = 42
    synthetic_merchants: int = Field(5, ge=1)
    synthetic_users: int = Field(2000, ge=10)
    synthetic_ads: int = Field(600, ge=20)
    synthetic_categories: int = Field(12, ge=2, le=20)
    # model and local training
    factors: int = Field(16, ge=1, le=1024)
    local_epochs: int = Field(1, ge=1)
    user_solver_iters: int = Field(8, ge=1)
    user_l2: float = Field(5.0, gt=0)
    ad_l2: float = Field(1e-4, ge=0)
    learning_rate: float = Field(0.02, gt=0)
    negatives: int = Field(4, ge=1)
    batch_users: int = Field(64, ge=1)
    max_positives_per_user: int = Field(200, ge=1)
    # MF solver: "als" (alternating least squares: exact user step, the server solves the ads
    # from released sufficient statistics; private ALS under DP) or "sgd" (logistic MF, ad step
    # by (DP-)SGD on the client); shared/als.py, docs/PRIVACY.md
    mf_solver: Literal["als", "sgd"] = "als"
    als_alpha0: float = Field(0.5, gt=0, description="weight of every unobserved (user, ad) pair")
    als_user_l2: float = Field(1.0, gt=0)
    als_ad_l2: float = Field(1.0, gt=0)
    als_noise_ridge: float = Field(20.0, ge=0, description="ridge added per unit of noise std of the summed target")
    als_max_rows: int = Field(20, ge=1, description="k: a user's rows weigh min(1, sqrt(k / rows)) under DP")
    als_user_clip: float = Field(0.2, gt=0, description="C: user factor norm bound of the released statistics")
    als_gram: Literal["auto", "shared", "per-ad"] = Field("auto", description="auto: per-ad without DP (exact ALS), shared under DP")
    als_count_shrinkage: float = Field(20.0, ge=0, description="under DP: ad factors scaled by n / (n + this)")
    als_budget_growth: float = Field(2.33, gt=0, description="under DP: round r gets a budget share ~ growth^r")
    als_catalog_prior: bool = Field(False, description="under DP: rarely seen ads lean on the mean factors of their public catalog tags (attributes, genres, category)")
    init: Literal["random", "catalog"] = Field("random", description="initial ad factors: random, or from the public catalog's categories")
    # privacy: "none", "user" (user-level DP-SGD with Opacus) or "client" (Flower's
    # client-level DP: server-side clipping and noise of whole merchant updates); docs/PRIVACY.md
    privacy: Literal["none", "user", "client"] = "none"
    target_epsilon: float = Field(8.0, gt=0)
    target_delta: float = Field(0.0, ge=0, lt=1, description="0 = auto: 0.1 / users of the shard")
    max_grad_norm: float = Field(0.1, gt=0)
    dp_grad_sample_mode: Literal["auto", "fused", "opacus", "hooks", "ghost"] = "auto"
    dp_metrics: Literal["noised", "none", "exact"] = "noised"
    metrics_noise_multiplier: float = Field(20.0, gt=0)
    client_noise_multiplier: float = Field(1.0, gt=0)
    client_clip_norm: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _paths_for_dataset(self) -> RunConfig:
        # "logs": in a deployment each merchant's node config names its own log; only a
        # simulation reads data-path (shared/data/sources.load_dataset says so if it is missing)
        if self.dataset in ("movielens-100k", "amazon-seq") and not self.data_path:
            raise ValueError(f"dataset '{self.dataset}' needs data-path")
        if self.dataset in ("amazon-seq", "logs") and not self.catalog_path:
            raise ValueError(f"dataset '{self.dataset}' needs catalog-path (the ad catalog / item attributes)")
        if self.privacy == "client" and self.mf_solver != "sgd":
            raise ValueError("privacy 'client' (Flower's clipping of whole model updates) needs mf-solver 'sgd': "
                             "ALS replies are statistics, not model updates")
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], source: str = RUN_CONFIG_SOURCE) -> RunConfig:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def to_flower(self) -> dict[str, Any]:
        """Dashed keys, as `flwr run -c` and Flower's run config use them."""
        return self.model_dump(by_alias=True)

    def data_config(self) -> RunConfig:
        """Only the fields that decide the run's dataset and its shards (the rest at their
        defaults): the key of data caches, as a simulation actor serves many runs that
        differ only in training or outputs."""
        return RunConfig(**{name: getattr(self, name) for name in DATA_FIELDS})

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).resolve()
