"""The run configuration: one typed model, the source of truth for every run-config key.

Flower hands over `[tool.flwr.app.config]` of pyproject.toml, merged with `flwr run -c`
overrides, as a flat dict with dashed keys. That table is generated from `RunConfig`
(`python -m shared.config_table --write`; tests/test_config.py fails on any drift), so the
defaults here are the defaults of every run, in Flower or in the harness. `RunConfig.from_flower`
validates a run config once where it enters (ServerApp, ClientApp, harness); a bad value raises
`ConfigError` naming the key and where the value came from.

A merchant's own settings are its node config (shared/node_config.py), not the run config.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# private ALS's plan gives statistics release r a budget share ~ growth^r (shared/als.py): its first
# release's noise is growth^((num-rounds - 2) / 2) times its last's. Past 12 decades that release
# carries nothing, and further on its noise leaves float32's range (a non-finite release)
MAX_RELEASE_NOISE_DECADES = 12.0
RUN_CONFIG_SOURCE = "pyproject.toml [tool.flwr.app.config] (or a `flwr run -c` override)"


class ConfigError(ValueError):
    pass


def dashed(name: str) -> str:
    return name.replace("_", "-")


# outside the code (Flower's configs, TOML files) only the dashed keys are valid (`by_name=False`);
# code may build a model by field name
DASHED_KEYS = ConfigDict(extra="forbid", alias_generator=dashed, validate_by_name=True, validate_by_alias=True, frozen=True)


def line_of(text: str, location: tuple[Any, ...]) -> int | None:
    """Line of the key `location[-1]` inside TOML table `location[:-1]` of `text` (best effort,
    for messages); a key that is missing points at its table's header."""
    keys = [str(k) for k in location if not isinstance(k, int)]
    if not keys:
        return None
    table, key = keys[:-1], keys[-1]
    current: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        header = re.match(r"^\s*\[([^\]]+)\]\s*(#.*)?$", line)
        if header:
            current = [part.strip() for part in header.group(1).split(".")]
            continue
        if current == table and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    for number, line in enumerate(lines, start=1):
        if table and re.match(rf"^\s*\[{re.escape('.'.join(table))}\]", line):
            return number
    return None


def format_validation_error(exc: ValidationError, source: str, text: str | None = None) -> str:
    """One line per invalid field; with the source's `text`, each names its line too."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        where = f"{source}:{line_of(text, tuple(err['loc'])) or '?'}: " if text is not None else ""
        lines.append(f"  {where}field '{key}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def read_toml(path: str | Path, error: type[ValueError] = ConfigError) -> tuple[str, dict[str, Any]]:
    """The text and content of a TOML file; `error` names the file when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc}") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` as `flwr run -c` takes it: the value in TOML syntax, or else a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


# the fields that decide a run's dataset and its shards: the key of the data caches
DATA_FIELDS = (
    "dataset", "data_path", "catalog_path", "partitioning", "dirichlet_alpha", "seed",
    "synthetic_merchants", "synthetic_users", "synthetic_ads", "synthetic_categories",
)
# keys that steer only the server's bookkeeping: a merchant's answer to an instruction does not
# depend on them, so its record of a release ignores them (a resumed run asks the same question)
SERVER_BOOKKEEPING_KEYS = frozenset({"output-dir", "resume", "resume-accept-changes", "carry-evaluation"})
# what resume-accept-changes may name besides config keys: the catalog's content (server/checkpoint.py)
RESUME_CHANGES_BEYOND_CONFIG = frozenset({"catalog"})
# section titles of pyproject's table, by the first field of each section
SECTIONS = {
    "output_dir": "Outputs and state",
    "num_rounds": "Rounds and node sampling",
    "dataset": "Data",
    "factors": "Model and local training",
    "mf_solver": "MF solver",
    "privacy": "Privacy (docs/PRIVACY.md)",
}


class RunConfig(BaseModel):
    """Every run-config key, its default, its bounds and what it means (the description is
    the comment of its line in pyproject.toml)."""

    model_config = DASHED_KEYS

    output_dir: str = Field("outputs/default", description="where the ServerApp writes checkpoints, metrics and the exported model")
    state_dir: str = Field("outputs/default/state", description=(
        "where simulated merchants keep their state (one folder per node); "
        "a deployed SuperNode names its own state-dir in its node config"))
    resume: bool = Field(False, description="continue after the last checkpoint in output-dir")
    resume_accept_changes: str = Field("", description=(
        "keys (comma-separated) a resume may change from the checkpoint's run config, and 'catalog': the catalog's content "
        "(the same ads in the same order); any other change is refused"))
    num_rounds: int = Field(10, ge=1, description="federated training rounds")
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of the nodes sampled for each training round")
    min_nodes: int = Field(2, ge=1, description="nodes a round waits for (training and evaluation)")
    min_replies: int = Field(0, ge=0, description=(
        "quorum: valid training replies a round needs (0 = min-nodes); below it the round is retried, then the run stops short (non-zero exit)"))
    round_retries: int = Field(1, ge=0, description="times a round short of its quorum is asked again before the run stops")
    max_users_per_merchant: int = Field(100_000, ge=1, description=(
        "public upper bound on a merchant's users (its policy's max-users): statistics no such merchant can send are dropped"))
    robust_aggregation: Literal["none", "median"] = Field("none", description=(
        "none | median (ALS: each merchant's per-ad statistics clipped to robust-clip-factor x the median over merchants; "
        "SGD: Flower's FedMedian)"))
    robust_clip_factor: float = Field(3.0, gt=0, description="robust-aggregation = median: a merchant's block norm, at most this x the median")
    probe_messages: int = Field(0, ge=0, description=(
        "empty messages sent to every node before round 0, each exchange timed (probes.json in output-dir): the per-message floor"))
    reply_timeout: float = Field(600.0, gt=0, description="seconds the server waits for the replies of one round's messages")
    carry_evaluation: Literal["auto", True, False] = Field("auto", description=(
        "each training message also asks for the evaluation of the model it carries (the previous round's): one exchange per "
        "round instead of two, the last model evaluated on its own; a round's metrics come with the next round's replies. "
        "auto: carried unless fraction-train < 1 or secure-aggregation (then apart); false: always apart"))
    dataset: Literal["synthetic", "movielens-100k", "amazon-seq", "logs"] = Field(
        "synthetic", description="synthetic | movielens-100k | amazon-seq | logs (a log table or user-item pairs: docs/DATA.md)")
    data_path: str = Field("", description=(
        "the dataset's file or folder (simulations); deployed merchants name their log in their node config"))
    catalog_path: str = Field("", description=(
        "the public ad catalog (logs) / item attributes (amazon-seq); logs in a simulation without one: the log's own ads"))
    partitioning: Literal["merchant", "region", "iid", "dirichlet"] = Field(
        "merchant", description="how a simulation cuts shards: merchant | region | iid | dirichlet")
    dirichlet_alpha: float = Field(0.5, gt=0, description="non-IID-ness of partitioning = dirichlet (smaller: more skewed)")
    seed: int = Field(42, description="seed of data generation, shards, initial parameters and sampling (never of DP noise)")
    synthetic_merchants: int = Field(5, ge=1, description="merchants of the synthetic market")
    synthetic_users: int = Field(2000, ge=10, description="users of the synthetic market")
    synthetic_ads: int = Field(600, ge=20, description="ads of the synthetic catalog")
    synthetic_categories: int = Field(12, ge=2, le=20, description="ad categories of the synthetic catalog")
    factors: int = Field(16, ge=1, le=1024, description="latent factors per user and per ad")
    local_epochs: int = Field(1, ge=1, description="SGD: local epochs of the ad step per round")
    user_solver_iters: int = Field(8, ge=1, description="SGD: Newton iterations of the user step")
    user_l2: float = Field(5.0, gt=0, description="SGD: L2 of the user step")
    ad_l2: float = Field(1e-4, ge=0, description="SGD: L2 of the touched ad parameters in the ad step")
    learning_rate: float = Field(0.02, gt=0, description="SGD: Adam's learning rate of the ad step")
    negatives: int = Field(4, ge=1, description="SGD: sampled negatives per positive")
    batch_users: int = Field(64, ge=1, description=(
        "SGD: users per mini-batch; under DP the public divisor of the noisy gradient sum (the shard's size is private)"))
    max_positives_per_user: int = Field(200, ge=1, description="SGD: a user's positives per epoch, at most")
    mf_solver: Literal["als", "sgd", "neumf"] = Field("als", description=(
        "als (alternating least squares; private ALS under privacy = user) | sgd (logistic MF; DP-SGD under privacy = user) | "
        "neumf (neural CF: GMF + MLP towers, trained like sgd; DP-SGD with Opacus' per-user clipping under privacy = user)"))
    neumf_layers: str = Field("32,16", description=(
        "NeuMF: widths of the MLP tower's hidden layers (comma-separated), after the user and ad embeddings' concatenation"))
    neumf_content: bool = Field(False, description=(
        "NeuMF: each ad's embeddings add a learned projection of its public content (category, brand, tags, title n-grams)"))
    content_dim: int = Field(64, ge=1, le=1024, description=(
        "NeuMF content tower: width of the catalog's content embedding (a truncated SVD of the sparse content features)"))
    neumf_user_steps: int = Field(20, ge=1, description="NeuMF: Adam steps of the user step (local, exact, non-private)")
    neumf_user_lr: float = Field(0.05, gt=0, description="NeuMF: Adam's learning rate in the user step")
    als_alpha0: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description=(
        "weight of every unobserved (user, ad) pair; auto: 8 x the density (rows / (users x ads)) of the data "
        "each party holds without DP, 0.5 under DP (the density is private)"))
    als_user_l2: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description=(
        "L2 of the ALS user step; auto: 3 without DP, 1 under DP (the noise-aware ridge regularizes there)"))
    als_ad_l2: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description=(
        "L2 of the ALS ad step; auto: 3 without DP, 1 under DP (the noise-aware ridge regularizes there)"))
    als_noise_ridge: float = Field(20.0, ge=0, description="DP: ridge added per unit of noise std of the summed statistics")
    als_max_rows: int = Field(5, ge=1, description="DP: a user's rows weigh min(1, sqrt(k / rows)): bounded contribution")
    als_user_clip: float = Field(0.2, gt=0, description="DP: user factor norm bound in the released statistics")
    als_gram: Literal["auto", "shared", "per-ad", "sparse"] = Field("auto", description=(
        "auto (sparse without DP, shared under DP) | shared (count x average user Gramian) | per-ad (exact, every ad) | "
        "sparse (exact, without DP only: the ads a merchant's rows touch, each Gramian's upper triangle)"))
    als_count_shrinkage: float = Field(1.0, ge=0, description=(
        "DP: ad factors scaled by noisy count / (count + this x the noise std of the summed count)"))
    als_budget_growth: float = Field(2.33, gt=0, description=(
        "DP: round r's share of the budget grows as growth^r; growth^((num-rounds - 2) / 2) at most 1e12"))
    als_catalog_prior: bool = Field(True, description=(
        "DP: rarely seen ads lean on the mean factors of their public catalog tags (attributes, genres, category), "
        "at als-catalog-prior-weight"))
    als_catalog_prior_weight: float = Field(0.01, ge=0, le=1, description=(
        "DP, with als-catalog-prior: the share of its tags' mean factors a rarely seen ad takes (at 1 their scores reach "
        "popular ads' and full-ranking NDCG halves; 0.01 orders rare ads among themselves: docs/BENCHMARKS.md)"))
    content_affinity: float = Field(1.6, ge=0, description=(
        "weight of content affinity in a merchant's ranking: the ads' public tags against those of the user's own recent "
        "positives, weighed by how concentrated they are (shared/content_affinity.py; local, no privacy cost; 0: the model alone)"))
    content_affinity_halflife: float = Field(3.0, gt=0, description=(
        "content affinity: a positive's weight in the user's profile halves every this many later positives"))
    init: Literal["random", "catalog"] = Field("random", description=(
        "initial ad factors: random | catalog (an embedding of the public category)"))
    privacy: Literal["none", "user", "client"] = Field("user", description=(
        "user (user-level DP: private ALS, or Opacus DP-SGD with mf-solver = sgd) | none | client (Flower's client-level DP); "
        "a merchant's own policy (its node config) may refuse what a run asks"))
    target_epsilon: float = Field(8.0, gt=0, description="total budget per merchant over the whole training (at most the merchant's max-epsilon)")
    target_delta: float = Field(0.0, ge=0, lt=1, description="0 = the merchant policy's delta (default 1e-6); a run may ask for less, never more")
    dp_sample_rate: float = Field(0.25, gt=0, le=1, description=(
        "DP-SGD: Poisson rate at which users join a step, 1 / an integer (public, not derived from the shard's size)"))
    max_grad_norm: float = Field(0.1, gt=0, description="DP-SGD: per-user clip norm of the ad step's gradient")
    dp_grad_sample_mode: Literal["auto", "fused", "opacus", "hooks", "ghost"] = Field("auto", description=(
        "DP-SGD: auto (= fused: closed-form per-user clipping) | opacus (hooks or ghost by size) | hooks | ghost"))
    dp_metrics: Literal["noised", "none"] = Field("noised", description=(
        "under user-level DP, how evaluation metrics leave a merchant: noised | none (simulations evaluate exactly in the harness)"))
    metrics_noise_multiplier: float = Field(20.0, gt=0, description="noise multiplier of each noised metrics release")
    secure_aggregation: bool = Field(False, description=(
        "private ALS: Flower's SecAgg+; each merchant adds noise for 1 / threshold of the sum's and the server sees only the sum"))
    wire_dtype: Literal["auto", "float32", "float16"] = Field("auto", description=(
        "private ALS's noisy release on the wire: auto (float16 on the plain path: its rounding is about 4e-4 of the DP noise, "
        "docs/BENCHMARKS.md \"Scale\"; float32 under secure aggregation and without DP) | float32 | float16 (an array whose "
        "values float16 cannot hold is sent as float32)"))
    secure_threshold: float = Field(0.8, gt=0, le=1, description=(
        "secure aggregation: merchants (share of those sampled, at least 2) whose releases every unmasked sum holds"))
    client_noise_multiplier: float = Field(1.0, gt=0, description="privacy = client: Flower's server-side noise multiplier")
    client_clip_norm: float = Field(1.0, gt=0, description="privacy = client: Flower's server-side fixed clipping norm")

    @field_validator("neumf_layers")
    @classmethod
    def _widths(cls, text: str) -> str:
        parts = text.split(",")
        if not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
            raise ValueError(f"neumf-layers must be comma-separated positive integers, got {text!r}")
        return text

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        # "logs": in a deployment each merchant's node config names its own log; only a
        # simulation reads data-path (shared/data/sources.load_dataset says so if it is missing)
        if self.dataset in ("movielens-100k", "amazon-seq") and not self.data_path:
            raise ValueError(f"dataset '{self.dataset}' needs data-path")
        if self.dataset == "amazon-seq" and not self.catalog_path:
            raise ValueError("dataset 'amazon-seq' needs catalog-path (the item attributes)")
        # a simulation's log may come without a catalog (its own ads are the catalog); deployed
        # merchants' logs are mapped onto one public catalog, which the server must read too
        if self.dataset == "logs" and not self.catalog_path and not self.data_path:
            raise ValueError("dataset 'logs' needs catalog-path (the public ad catalog), or in a simulation data-path "
                             "(a log whose own ads are then the catalog)")
        if abs(1.0 / self.dp_sample_rate - round(1.0 / self.dp_sample_rate)) > 1e-9:
            raise ValueError(f"dp-sample-rate {self.dp_sample_rate} must be 1 / an integer (a whole number of DP-SGD steps per epoch)")
        unknown = self.accepted_resume_changes - set(self.to_flower()) - RESUME_CHANGES_BEYOND_CONFIG
        if unknown:
            raise ValueError(f"resume-accept-changes names unknown keys: {', '.join(sorted(unknown))}")
        if self.privacy == "client" and self.mf_solver == "als":
            raise ValueError("privacy 'client' (Flower's clipping of whole model updates) needs mf-solver 'sgd' or 'neumf': "
                             "ALS replies are statistics, not model updates")
        if self.privacy == "client" and self.neumf_content and self.mf_solver == "neumf":
            raise ValueError("privacy 'client' noises every aggregated array on the server, the catalog's public content "
                             "embedding included: use neumf-content = false with it")
        if self.mf_solver == "neumf" and self.dp_grad_sample_mode == "fused":
            raise ValueError("dp-grad-sample-mode 'fused' is MF's closed form; NeuMF's per-user clipping is Opacus' "
                             "(auto, opacus, hooks or ghost)")
        if self.als_gram == "sparse" and self.privacy == "user":
            raise ValueError("als-gram 'sparse' sends which ads a merchant's users touched, itself private: under privacy "
                             "'user' use 'shared' or 'per-ad' (dense releases)")
        if self.carry_evaluation is True and self.fraction_train < 1:
            raise ValueError("carry-evaluation evaluates a model on the merchants the next round samples for training: with "
                             "fraction-train < 1 the others would go unevaluated; evaluate apart (carry-evaluation = false)")
        if self.carry_evaluation is True and self.secure_aggregation:
            raise ValueError("carry-evaluation adds the evaluation to a training message; under secure-aggregation training is "
                             "four messages of the protocol: evaluate on its own (carry-evaluation = false)")
        if self.secure_aggregation and (self.privacy != "user" or self.mf_solver != "als"):
            raise ValueError("secure-aggregation carries the private-ALS release (privacy 'user', mf-solver 'als'): one Gaussian "
                             "sum per round, which several merchants can noise in shares; a DP-SGD update is many noisy steps")
        if self.privacy == "user" and self.mf_solver == "als" and self.num_rounds > 2:
            decades = (self.num_rounds - 2) * abs(math.log10(self.als_budget_growth)) / 2
            if decades > MAX_RELEASE_NOISE_DECADES:
                bound = 10 ** (2 * MAX_RELEASE_NOISE_DECADES / (self.num_rounds - 2))
                raise ValueError(
                    f"als-budget-growth {self.als_budget_growth:g} over num-rounds {self.num_rounds} gives private ALS's first "
                    f"statistics release noise 1e{decades:.0f} times its last one's (at most 1e{MAX_RELEASE_NOISE_DECADES:.0f}: "
                    f"beyond, a release carries nothing and its noise overflows): use an als-budget-growth of at most "
                    f"{bound:.3f} (and at least {1 / bound:.3f}) for {self.num_rounds} rounds, or fewer rounds")
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], source: str = RUN_CONFIG_SOURCE) -> RunConfig:
        """A run config as Flower holds it (dashed keys; missing keys take their defaults)."""
        try:
            return cls.model_validate(dict(run_config), by_name=False)  # from outside: dashed keys only
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def to_flower(self) -> dict[str, Any]:
        """Dashed keys, as `flwr run -c` and Flower's run config use them."""
        return self.model_dump(by_alias=True)

    def with_values(self, source: str = RUN_CONFIG_SOURCE, **values: Any) -> RunConfig:
        """A copy with some keys changed (dashed or not), validated again; errors name `source`."""
        return RunConfig.from_flower({**self.to_flower(), **{dashed(k): v for k, v in values.items()}}, source)

    def data_config(self) -> RunConfig:
        """Only the fields that decide the run's dataset and its shards (the rest at their
        defaults): the key of data caches, as a simulation actor serves many runs that
        differ only in training or outputs."""
        return RunConfig(**{name: getattr(self, name) for name in DATA_FIELDS})

    @property
    def mlp_layers(self) -> tuple[int, ...]:
        """neumf-layers as widths (checked when the config is built)."""
        return tuple(int(part) for part in self.neumf_layers.split(","))

    @property
    def evaluation_carried(self) -> bool:
        """Whether each training message carries the previous model's evaluation: carry-evaluation
        resolved ("auto": wherever it is valid, every node sampled for training and no secure
        aggregation)."""
        if self.carry_evaluation == "auto":
            return self.fraction_train == 1 and not self.secure_aggregation
        return self.carry_evaluation is True

    @property
    def quorum(self) -> int:
        return self.min_replies or self.min_nodes

    @property
    def accepted_resume_changes(self) -> frozenset[str]:
        return frozenset(key.strip() for key in self.resume_accept_changes.split(",") if key.strip())

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).resolve()
