"""A node's own configuration: what the merchant (not the server) decides for its SuperNode.

A deployed merchant writes it as a TOML file and starts its SuperNode with
`flower-supernode --node-config FILE` (deploy/merchant.py writes it); the ClientApp reads it
from Flower's `Context.node_config`, and the merchant agent (`fedads-merchant --node-config`)
reads the same file. In a simulation, Flower gives every virtual node `partition-id` and
`num-partitions` instead, and the node cuts its shard from the run's dataset.

A deployed merchant's privacy policy (shared/privacy_policy.py) is part of it: `privacy-mode`,
`max-epsilon`, `delta`, `metrics-release`, `solvers`, `secure-aggregation`, `secure-colluders`; what it leaves out takes the private
defaults. A simulated node's policy is its run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, ValidationError, model_validator

from shared.config import DASHED_KEYS, ConfigError, RunConfig, format_validation_error, line_of, read_toml
from shared.privacy_policy import DEFAULT_DELTA, DEFAULT_MAX_USERS, SOLVERS, PrivacyPolicy, validation_reasons

FLOWER_NODE_CONFIG = "the SuperNode's node config (flower-supernode --node-config)"
PATH_KEYS = ("data-path", "catalog-path", "state-dir")


class NodeConfig(BaseModel):
    model_config = DASHED_KEYS

    # a deployed merchant: its own files
    data_path: str = Field("", description="the merchant's interaction log (CSV or Parquet)")
    catalog_path: str = Field("", description="the public ad catalog (default: the run's catalog)")
    state_dir: str = Field("", description=(
        "user factors, privacy ledger and the latest global model (default: <run state-dir>/<merchant-id>)"))
    merchant_id: str = Field("", description="the merchant's name in replies and logs (default: the log file's stem)")
    # the deployed merchant's privacy policy: what it gives whatever a run asks (private by default)
    privacy_mode: Literal["user", "none"] = Field("user", description="user: user-level DP required | none: no DP claim")
    max_epsilon: float = Field(8.0, gt=0, description="the most epsilon the merchant's ledger may ever spend")
    delta: float = Field(DEFAULT_DELTA, gt=0, lt=1, description="the public delta of the merchant's guarantee")
    max_users: int = Field(DEFAULT_MAX_USERS, ge=1, description="a public upper bound on the merchant's users (delta stays below 1 / it)")
    metrics_release: Literal["noised", "none"] = Field("noised", description="how evaluation metrics may leave under DP")
    solvers: str = Field(",".join(SOLVERS), description="comma-separated solvers the merchant trains: als, sgd, neumf")
    secure_aggregation: Literal["allow", "require", "refuse"] = Field("refuse", description=(
        "refuse | allow | require: secure aggregation, where each release carries a share of the noise (docs/PRIVACY.md)"))
    secure_colluders: int = Field(0, ge=0, description="merchants that may collude with the server against this one's users")
    # a simulated node: Flower's partition of the run's dataset
    partition_id: int | None = Field(None, ge=0)
    num_partitions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _deployed_or_simulated(self) -> NodeConfig:
        simulated = self.partition_id is not None or self.num_partitions is not None
        if simulated == bool(self.data_path):
            raise ValueError("a node config names either data-path (a deployed merchant) "
                             "or partition-id and num-partitions (a simulated node), not both or neither")
        if simulated and (self.partition_id is None or self.num_partitions is None or self.partition_id >= self.num_partitions):
            raise ValueError(f"partition-id {self.partition_id} out of num-partitions {self.num_partitions}")
        unknown = {s.strip() for s in self.solvers.split(",")} - set(SOLVERS)
        if unknown or not self.solvers.strip():
            raise ValueError(f"solvers must name some of {', '.join(SOLVERS)}, got {self.solvers!r}")
        try:
            self.pinned_policy()
        except ValidationError as exc:
            raise ValueError(validation_reasons(exc)) from None
        return self

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    def policy(self, cfg: RunConfig) -> PrivacyPolicy:
        """The privacy this node gives: its merchant's policy, or in a simulation, its run's."""
        if self.simulated:
            return PrivacyPolicy.for_simulation(cfg)
        return self.pinned_policy()

    def pinned_policy(self) -> PrivacyPolicy:
        """The policy of this node config's own keys (a deployed merchant's)."""
        solvers = tuple(s.strip() for s in self.solvers.split(",") if s.strip())
        return PrivacyPolicy.model_validate({"mode": self.privacy_mode, "max_epsilon": self.max_epsilon, "delta": self.delta,
                                             "max_users": self.max_users, "metrics": self.metrics_release, "solvers": solvers,
                                             "secure_aggregation": self.secure_aggregation, "secure_colluders": self.secure_colluders})

    @property
    def name(self) -> str:
        """The node's name in its state directory: merchant id, log stem, or partition-N."""
        if self.simulated:
            return f"partition-{self.partition_id}"
        return self.merchant_id or Path(self.data_path).stem

    def state_path(self, cfg: RunConfig) -> Path:
        """Where this node keeps its state: its own state-dir, or one folder per node under the run's."""
        return Path(self.state_dir) if self.state_dir else Path(cfg.state_dir) / self.name

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any], source: str = FLOWER_NODE_CONFIG) -> NodeConfig:
        try:
            return cls.model_validate(dict(node_config), by_name=False)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        """A node-config TOML file; errors name the file, the line and the field. Its paths must
        be absolute: Flower hands the file's values to the ClientApp as they are, and the
        SuperNode, the merchant agent and the deploy script may each start in another folder."""
        text, values = read_toml(path)
        for key in PATH_KEYS:
            if isinstance(values.get(key), str) and values[key] and not Path(values[key]).is_absolute():
                raise ConfigError(f"{path}:{line_of(text, (key,)) or '?'}: field '{key}': {values[key]!r} must be an absolute path "
                                  "(the SuperNode and the merchant agent may run from different folders)")
        try:
            return cls.model_validate(values, by_name=False)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(path), text)) from None

    def write(self, path: str | Path) -> Path:
        """As TOML (the keys that are set, absolute paths), for `flower-supernode --node-config`."""
        values = self.model_dump(by_alias=True, exclude_defaults=True)
        for key in PATH_KEYS:
            if values.get(key):
                values[key] = str(Path(values[key]).resolve())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(values))
        return path
