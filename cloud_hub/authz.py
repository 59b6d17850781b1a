"""Neutral access control: one pure function decides, before every operation on client data or actions.

The paper's correctness rule: "prepending each operation that either handles sensitive data or triggers sensitive
actions with checks to ensure that the stakeholder is allowed to do so". Every rule is evaluated at the time the
data or action refers to, because clients change supplier.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Action(StrEnum):
    """Everything a principal may ask the hub to do."""

    MANAGE_RETAILER = "manage_retailer"
    MANAGE_CLIENT = "manage_client"
    READ_CLIENT = "read_client"
    TRIGGER_EMERGENCY = "trigger_emergency"
    READ_REQUEST = "read_request"
    REPORT_OUTCOME = "report_outcome"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the DSO, an administrator, or one retailer."""

    kind: Literal["dso", "admin", "retailer"]
    retailer_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> Principal:
        """``dso``, ``admin`` or ``retailer:<id>``."""
        if text in ("dso", "admin"):
            return cls(text)  # type: ignore[arg-type]
        kind, _, rid = text.partition(":")
        if kind == "retailer" and rid:
            return cls("retailer", rid)
        raise ValueError(f"unknown principal {text!r}: expected dso, admin or retailer:<id>")

    def __str__(self) -> str:
        return f"retailer:{self.retailer_id}" if self.kind == "retailer" else self.kind


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and the right it rests on (recorded in the data access log)."""

    allowed: bool
    right: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Context:
    """What the decision needs to know about the resource, looked up at the time the operation refers to."""

    supplier_at_time: str | None = None
    """The retailer that supplied the client at the time the data or action refers to."""
    issuer: str | None = None
    """The principal that created the request being read."""
    addressed_retailer: str | None = None
    """The retailer the hub sent this client's request to."""


_DSO_ONLY = {Action.MANAGE_CLIENT, Action.TRIGGER_EMERGENCY}


def decide(who: Principal, action: Action, ctx: Context | None = None) -> Decision:
    """Decide whether ``who`` may perform ``action`` on the resource described by ``ctx``."""
    ctx = ctx or Context()
    if action is Action.MANAGE_RETAILER:
        if who.kind in ("admin", "dso"):
            return Decision(True, f"{who.kind}:manage-registry")
        return Decision(False, "none", "only the DSO or an administrator registers retailers")
    if action in _DSO_ONLY:
        if who.kind == "dso":
            return Decision(True, f"dso:{action.value}")
        return Decision(False, "none", f"only the DSO may {action.value.replace('_', ' ')}")
    if action is Action.READ_CLIENT:
        if who.kind == "dso":
            return Decision(True, "dso:registry")
        if who.kind == "retailer" and ctx.supplier_at_time is not None and ctx.supplier_at_time == who.retailer_id:
            return Decision(True, "retailer:current-supplier")
        return Decision(False, "none", "a retailer may read only its own clients")
    if action is Action.READ_REQUEST:
        if ctx.issuer is not None and ctx.issuer == str(who):
            return Decision(True, "issuer")
        return Decision(False, "none", "only the issuer of a request may follow it")
    if action is Action.REPORT_OUTCOME:
        if who.kind == "retailer" and ctx.addressed_retailer is not None and ctx.addressed_retailer == who.retailer_id:
            return Decision(True, "retailer:addressed-supplier")
        return Decision(False, "none", "a retailer may report only on requests the hub sent it for that client")
    raise AssertionError(f"unhandled action {action}")  # every Action is handled above
