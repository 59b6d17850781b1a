"""The bodies of the hub's request-creating POSTs (``/v1/emergencies``, ``/v1/load-shifts``, ``/v1/load-reductions``,
``/v1/billing-data``, ``/v1/tariffs``) and of ``/v1/requests/{id}/revise``, as pydantic models.

The hub validates with them, and so does the DSO's console before it posts a form: one validator for both (the
console must not re-derive the hub's rules by hand).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from mhp_wire.ids import ID_PATTERN

ClientId = Annotated[str, Field(pattern=ID_PATTERN)]


class Targets(BaseModel):
    """Who a request is for: a list of clients or every client of a feeder."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] | None = Field(None, min_length=1, max_length=100_000)
    feeder_id: str | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_target(self) -> Targets:
        if not self.client_ids and not self.feeder_id:
            raise ValueError("give client_ids or feeder_id")
        if self.client_ids and self.feeder_id:
            raise ValueError("give client_ids or feeder_id, not both")
        return self


class EmergencyBody(Targets):
    """Emergency mode: hold the targeted homes under ``power_limit_kw`` from ``start`` for ``duration_s``."""

    start: AwareDatetime
    duration_s: int = Field(gt=0, le=7 * 24 * 3600)
    power_limit_kw: float = Field(ge=0, le=10_000)


class LoadShiftBody(Targets):
    """Load information: move flexible loads out of the window."""

    window_start: AwareDatetime
    window_end: AwareDatetime
    reason: str | None = Field(None, max_length=500)


class LoadReductionBody(Targets):
    """Reduce load by ``reduction_kw`` from ``start`` for ``duration_s``; retailers answer within the time given."""

    reduction_kw: float = Field(gt=0, le=1_000_000)
    start: AwareDatetime
    duration_s: int = Field(gt=0, le=7 * 24 * 3600)
    respond_within_s: float = Field(gt=0, le=3600)


class BillingBody(BaseModel):
    """Deliver billing data of these clients for a period to the retailer(s) that supplied them."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] = Field(min_length=1, max_length=100_000)
    period_start: AwareDatetime
    period_end: AwareDatetime


class TariffPeriodBody(BaseModel):
    """A price for a time span."""

    model_config = ConfigDict(extra="forbid")
    start: AwareDatetime
    end: AwareDatetime
    price_eur_per_kwh: float = Field(ge=-10, le=100)


class TariffBody(BaseModel):
    """A network tariff calendar."""

    model_config = ConfigDict(extra="forbid")
    tariff_id: ClientId
    valid_from: AwareDatetime
    valid_to: AwareDatetime
    periods: list[TariffPeriodBody] = Field(min_length=1, max_length=10_000)


class RevisionBody(BaseModel):
    """The fields of a request that a revision changes (which ones a type allows: docs/decisions.md)."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] | None = Field(None, min_length=1, max_length=100_000)
    feeder_id: str | None = Field(None, min_length=1, max_length=64)
    start: AwareDatetime | None = None
    duration_s: int | None = Field(None, gt=0, le=7 * 24 * 3600)
    power_limit_kw: float | None = Field(None, ge=0, le=10_000)
    window_start: AwareDatetime | None = None
    window_end: AwareDatetime | None = None
    reason: str | None = Field(None, max_length=500)
    reduction_kw: float | None = Field(None, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _changes_something(self) -> RevisionBody:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one field to change")
        return self


REQUEST_BODIES: dict[str, type[BaseModel]] = {"emergency": EmergencyBody, "load_shift": LoadShiftBody,
                                              "load_reduction": LoadReductionBody, "billing": BillingBody,
                                              "tariff": TariffBody}
"""Each request type and the model its creating POST validates a body with."""
