"""The [delivery] table of an experiment file: how the closed loop serves, and how its simulated users answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from shared.config import DASHED_KEYS

Policy = Literal["federated", "local-only", "popularity", "random"]
POLICIES: tuple[Policy, ...] = ("federated", "local-only", "popularity", "random")


class ResponseSettings(BaseModel):
    """Knobs of the simulated users (public to the harness, hidden from every model)."""

    model_config = DASHED_KEYS

    position_bias: float = Field(1.0, ge=0, description="examination of position k (0-based) is 1 / (k + 1)^this")
    click_offset: float = Field(-2.0, description="added to the generator's click logit: sets the base click rate")
    click_noise: float = Field(0.5, ge=0, description="std of per-impression Gaussian noise on the click logit")
    purchase_offset: float = Field(-2.0, description="logit of a purchase after a click, for an ad orthogonal to the user's taste")
    purchase_taste: float = Field(3.0, ge=0, description="weight of taste . ad in the purchase logit")
    mean_log_price: float = Field(3.0, description="prices are log-normal: mean of the log price")
    log_price_std: float = Field(0.6, ge=0, description="std of the log price")


class DeliverySettings(BaseModel):
    """The closed loop (simulations/delivery/loop.py): its rounds, slates, A/B/n arms and users."""

    model_config = DASHED_KEYS

    rounds: int = Field(20, ge=1, description="rounds of delivery (days, say); the global model is retrained before every retrain-every-th")
    slate_size: int = Field(5, ge=1, description="ads per slate")
    active_share: float = Field(0.5, gt=0, le=1, description="share of a merchant's users served in a round (a per-user hash draw)")
    exploration: float = Field(0.05, ge=0, le=1, description="epsilon-greedy: each slate position is a uniform draw with this probability")
    arms: list[Policy] = Field(default_factory=lambda: list(POLICIES), description="policies of the A/B/n test, each on an equal share of the users")
    experiment: str = Field("delivery", description="name of the user split (a new name splits the users anew)")
    retrain_every: int = Field(5, ge=1, description=(
        "rounds between federated releases (the global ads are retrained weekly, say, while every merchant refits its users "
        "on their new rows every round, locally and without privacy cost); under DP the budget is spread over the releases"))
    local_iterations: int = Field(2, ge=1, description="local-only: ALS iterations per round on the merchant's own log")
    responses: ResponseSettings = Field(default_factory=ResponseSettings)

    @property
    def releases(self) -> int:
        return (self.rounds - 1) // self.retrain_every + 1

    def release_of(self, server_round: int) -> int | None:
        """The federated release (1-based) made before round `server_round`'s delivery, if any."""
        return (server_round - 1) // self.retrain_every + 1 if (server_round - 1) % self.retrain_every == 0 else None

    @field_validator("arms")
    @classmethod
    def _distinct(cls, arms: list[Policy]) -> list[Policy]:
        if len(set(arms)) != len(arms) or len(arms) < 2:
            raise ValueError(f"arms must be two or more distinct policies of {', '.join(POLICIES)}; got {', '.join(arms)}")
        return arms
