"""Neutral access control: one pure function decides, before every operation on client data or actions.

The paper's correctness rule: "prepending each operation that either handles sensitive data or triggers sensitive
actions with checks to ensure that the stakeholder is allowed to do so". Every rule is evaluated at the time the
data or action refers to, because clients change supplier.

Neutrality also covers what a refusal says: a retailer is never told whether a client it does not supply exists.
A refusal marked ``conceal`` must be answered exactly as an unknown id is (``docs/decisions.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class Action(StrEnum):
    """Everything a principal may ask the hub to do."""

    MANAGE_RETAILER = "manage_retailer"
    MANAGE_CLIENT = "manage_client"
    READ_CLIENT = "read_client"
    UPLOAD_READINGS = "upload_readings"
    READ_CONSUMPTION = "read_consumption"
    REQUEST_BILLING = "request_billing"
    PUBLISH_TARIFF = "publish_tariff"
    TRIGGER_EMERGENCY = "trigger_emergency"
    TRIGGER_LOAD_SHIFT = "trigger_load_shift"
    TRIGGER_LOAD_REDUCTION = "trigger_load_reduction"
    READ_MEASUREMENTS = "read_measurements"
    READ_AUDIT = "read_audit"
    READ_REQUEST = "read_request"
    CANCEL_REQUEST = "cancel_request"
    REVISE_REQUEST = "revise_request"
    REPORT_OUTCOME = "report_outcome"
    SEND_MEASUREMENT = "send_measurement"
    READ_TARIFF = "read_tariff"
    DELIVER_BILLING = "deliver_billing"
    """The hub sending a client's readings to a retailer (the retailer is the principal: it receives them)."""
    READ_STATUS = "read_status"
    """The platform now: retailers' presence, open requests, refusals and errors in the last hour (the console)."""
    LIST_CLIENTS = "list_clients"
    """The client registry, paged, with every client's supplier history."""
    READ_FEEDER_MEASUREMENTS = "read_feeder_measurements"
    """A feeder's measured active power: the sum over its clients' measurements."""
    LIST_REQUESTS = "list_requests"
    """The requests the principal issued, newest first (docs/decisions.md: the DSO only)."""
    READ_EVENTS = "read_events"
    """Follow the change feed: of one request (``Context.issuer`` and ``addressed_retailers`` given) or of every
    request the principal may follow (no context)."""
    MANAGE_SUBSCRIPTION = "manage_subscription"
    """Create a webhook subscription (no context) or read or delete one (``Context.issuer``: its owner)."""
    MANAGE_PARTY = "manage_party"
    """Register an eligible party (``party:<id>``, docs/consent.md)."""
    REQUEST_PERMISSION = "request_permission"
    """An eligible party asks a client for access to their data (``Context.supplier_at_time``: the client exists)."""
    READ_PERMISSION = "read_permission"
    """Read or terminate a permission (``Context.issuer``: the party that asked for it)."""
    TERMINATE_PERMISSION = "terminate_permission"
    """End a permission, or withdraw an undecided request (``Context.issuer``: the party that asked for it)."""
    DECIDE_PERMISSION = "decide_permission"
    """Relay a customer's accept, reject or revoke, or show the customer their permissions and access log
    (``Context.supplier_at_time``: the client's supplier now; only it speaks for the customer)."""
    READ_BILLING_DATA = "read_billing_data"
    """A client's meter readings as used for its bills (the DSO; a party under the customer's permission with the
    ``billing_data`` scope, ``Context.permission_id``: docs/consent.md)."""
    LIST_PERMISSIONS = "list_permissions"
    """List the permissions the principal asked for (an eligible party: its own; nobody else has any)."""
    READ_VEN = "read_ven"
    """An OpenADR 3 VEN object and its resources (``Context.issuer``: the VEN's principal, ``retailer:<id>``)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the DSO, an administrator, one retailer, or one eligible party (docs/consent.md)."""

    kind: Literal["dso", "admin", "retailer", "party"]
    retailer_id: str | None = None
    party_id: str | None = None

    @classmethod
    def parse(cls, text: str) -> Principal:
        """``dso``, ``admin``, ``retailer:<id>`` or ``party:<id>``."""
        if text in ("dso", "admin"):
            return cls(text)  # type: ignore[arg-type]
        kind, _, rid = text.partition(":")
        if kind == "retailer" and rid:
            return cls("retailer", rid)
        if kind == "party" and rid:
            return cls("party", party_id=rid)
        raise ValueError(f"unknown principal {text!r}: expected dso, admin, retailer:<id> or party:<id>")

    def __str__(self) -> str:
        if self.kind == "party":
            return f"party:{self.party_id}"
        return f"retailer:{self.retailer_id}" if self.kind == "retailer" else self.kind


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and the right it rests on (recorded in the data access log)."""

    allowed: bool
    right: str
    reason: str = ""
    conceal: bool = False
    """A refusal that must look to the principal like an unknown id: the client is not its to know of."""


@dataclass(frozen=True, slots=True)
class Context:
    """What the decision needs to know about the resource, looked up at the time the operation refers to."""

    supplier_at_time: str | None = None
    """The retailer that supplied the client at the time the data or action refers to."""
    issuer: str | None = None
    """The principal that created the request being read."""
    addressed_retailers: tuple[str, ...] = ()
    """The retailers the hub sent this client's request to."""
    covered_by_supplier: str | None = None
    """The retailer that supplied the client over the whole time range asked for (None: nobody did alone)."""
    suppliers_in_range: tuple[str, ...] = ()
    """Every retailer that supplied the client at some time in the range asked for."""
    permission_id: str | None = None
    """For a party's read: the customer's permission that covers it now (its scope, period and validity; found by
    :func:`cloud_hub.consent.grant`), None when there is none."""


_DSO_ONLY = {Action.MANAGE_CLIENT, Action.UPLOAD_READINGS, Action.REQUEST_BILLING, Action.PUBLISH_TARIFF,
             Action.TRIGGER_EMERGENCY, Action.TRIGGER_LOAD_SHIFT, Action.TRIGGER_LOAD_REDUCTION,
             Action.READ_MEASUREMENTS, Action.READ_AUDIT, Action.READ_STATUS, Action.LIST_CLIENTS,
             Action.READ_FEEDER_MEASUREMENTS, Action.LIST_REQUESTS, Action.READ_BILLING_DATA}


# Complexity (C901, PLR0911, PLR0912): the one authorization table, one rule per branch, read top to bottom and tested
# case by case (tests/cloud_hub/test_authz.py).
def decide(who: Principal, action: Action, ctx: Context | None = None) -> Decision:  # noqa: C901, PLR0911, PLR0912
    """Decide whether ``who`` may perform ``action`` on the resource described by ``ctx``."""
    ctx = ctx or Context()
    if who.kind == "party":
        return _decide_party(who, action, ctx)
    if action is Action.READ_TARIFF:
        return Decision(True, "public:tariff")  # the network tariff is public: anyone with a token reads it
    if action in (Action.MANAGE_RETAILER, Action.MANAGE_PARTY):
        if who.kind in ("admin", "dso"):
            return Decision(True, f"{who.kind}:manage-registry")
        return Decision(False, "none", "only the DSO or an administrator registers retailers and parties")
    if action is Action.REQUEST_PERMISSION:
        return Decision(False, "none", "only an eligible party asks a customer for a permission")
    if action is Action.READ_PERMISSION:
        if who.kind == "dso":
            return Decision(True, "dso:permission-log")
        return Decision(False, "none", "a permission is read only by the party that asked for it", conceal=True)
    if action is Action.LIST_PERMISSIONS:
        return Decision(False, "none", "only an eligible party lists its own permissions (the DSO reads one by id)")
    if action is Action.TERMINATE_PERMISSION:
        return Decision(False, "none", "a permission is ended only by the party that asked for it (or revoked by "
                                       "the customer)", conceal=True)
    if action is Action.DECIDE_PERMISSION:
        # The customer decides in their current retailer's personal area: only that retailer speaks for them.
        if who.kind == "retailer" and ctx.supplier_at_time is not None and ctx.supplier_at_time == who.retailer_id:
            return Decision(True, "retailer:current-supplier")
        return Decision(False, "none", "only the client's current retailer relays the customer's decisions",
                        conceal=who.kind == "retailer")
    if action in _DSO_ONLY:
        if who.kind == "dso":
            return Decision(True, f"dso:{action.value}")
        return Decision(False, "none", f"only the DSO may {action.value.replace('_', ' ')}")
    if action is Action.READ_CLIENT:
        if who.kind == "dso":
            return Decision(True, "dso:registry")
        if who.kind == "retailer" and ctx.supplier_at_time is not None and ctx.supplier_at_time == who.retailer_id:
            return Decision(True, "retailer:current-supplier")
        return Decision(False, "none", "a retailer may read only its own clients", conceal=who.kind == "retailer")
    if action is Action.READ_CONSUMPTION:
        if who.kind == "dso":
            return Decision(True, "dso:consumption")
        owner = ctx.covered_by_supplier
        if who.kind == "retailer" and owner is not None and owner == who.retailer_id:
            return Decision(True, "retailer:supplier-of-period")
        # A retailer that supplied part of the range knows the client: it is told why; any other is not told
        # that the client exists.
        return Decision(False, "none",
                        "a retailer may read consumption only for periods in which it supplied that client",
                        conceal=who.kind == "retailer" and who.retailer_id not in ctx.suppliers_in_range)
    if action in (Action.READ_REQUEST, Action.CANCEL_REQUEST, Action.REVISE_REQUEST):
        if ctx.issuer is not None and ctx.issuer == str(who):
            return Decision(True, "issuer")
        verb = {Action.READ_REQUEST: "follow", Action.CANCEL_REQUEST: "cancel"}.get(action, "revise")
        return Decision(False, "none", f"only the issuer of a request may {verb} it")
    if action is Action.REPORT_OUTCOME:
        if who.kind == "retailer" and who.retailer_id in ctx.addressed_retailers:
            return Decision(True, "retailer:addressed-supplier")
        return Decision(False, "none", "a retailer may report only on requests the hub sent it for that client")
    if action is Action.SEND_MEASUREMENT:
        if who.kind == "retailer" and ctx.supplier_at_time is not None and ctx.supplier_at_time == who.retailer_id:
            return Decision(True, "retailer:supplier-at-time")
        return Decision(False, "none", "a retailer may send measurements only for its own clients at that time")
    if action is Action.DELIVER_BILLING:
        # A reading interval goes to the retailer that supplied the client for the whole of it; one that straddles
        # a supplier switch goes to neither (docs/decisions.md, "A reading interval across a supplier switch").
        owner = ctx.covered_by_supplier
        if who.kind == "retailer" and owner is not None and owner == who.retailer_id:
            return Decision(True, "retailer:supplier-of-period")
        return Decision(False, "none", "billing data goes only to the retailer that supplied the client for the "
                                       "whole of each reading interval")
    if action is Action.READ_EVENTS:
        # The feed is neutral like the GET it replaces: the DSO follows the requests it issued, a retailer the
        # requests that concern its clients (and sees only those clients, cloud_hub.feed.view); a request that does
        # not concern a retailer is answered as an unknown one.
        if who.kind == "dso" and ctx.issuer in (None, str(who)):
            return Decision(True, "issuer")
        if who.kind == "retailer" and (ctx.issuer is None or who.retailer_id in ctx.addressed_retailers):
            return Decision(True, "retailer:own-clients")
        if who.kind == "admin":
            return Decision(False, "none", "an administrator follows no requests")
        return Decision(False, "none", "only the issuer of a request, or a retailer of its clients, may follow it",
                        conceal=who.kind == "retailer")
    if action is Action.MANAGE_SUBSCRIPTION:
        if who.kind in ("dso", "retailer") and ctx.issuer in (None, str(who)):
            return Decision(True, "subscription-owner" if ctx.issuer else f"{who.kind}:subscribe")
        if who.kind == "admin":
            return Decision(False, "none", "an administrator follows no requests")
        return Decision(False, "none", "a subscription is managed only by its owner", conceal=True)
    if action is Action.READ_VEN:
        # OpenADR 3 (cloud_hub.openadr3): a VEN is a retailer or aggregator; it sees only itself and its own clients.
        if who.kind == "dso":
            return Decision(True, "dso:vens")
        if who.kind == "retailer" and ctx.issuer == str(who):
            return Decision(True, "retailer:own-ven")
        return Decision(False, "none", "a VEN may read only itself", conceal=who.kind == "retailer")
    raise AssertionError(f"unhandled action {action}")  # every Action is handled above


_PARTY_READS = {Action.READ_CONSUMPTION: "consumption", Action.READ_MEASUREMENTS: "measurements",
                Action.READ_BILLING_DATA: "billing data"}


def _decide_party(who: Principal, action: Action, ctx: Context) -> Decision:
    """An eligible party: it reads the public tariff, asks customers for permissions, follows and ends its own, and
    reads a client's data only under a permission the customer gave it that is valid now (docs/consent.md). It is
    never told whether a client exists beyond what its own request for a permission tells it."""
    if action is Action.READ_TARIFF:
        return Decision(True, "public:tariff")
    if action is Action.REQUEST_PERMISSION:
        return Decision(True, "party:request-permission")
    if action in (Action.READ_PERMISSION, Action.TERMINATE_PERMISSION):
        return _decide_party_own_permission(who, ctx)
    if action is Action.LIST_PERMISSIONS:
        return Decision(True, "party:own-permissions")
    if action in _PARTY_READS:
        return _decide_party_read(action, ctx)
    return Decision(False, "none", f"an eligible party may not {action.value.replace('_', ' ')}",
                    conceal=action in (Action.READ_CLIENT, Action.READ_EVENTS, Action.MANAGE_SUBSCRIPTION))


def _decide_party_own_permission(who: Principal, ctx: Context) -> Decision:
    """A party reads or ends a permission only if it is the party that asked for it (concealed otherwise)."""
    if ctx.issuer is not None and ctx.issuer == str(who):
        return Decision(True, "issuer")
    return Decision(False, "none", "a permission is read or ended only by the party that asked for it",
                    conceal=True)


def _decide_party_read(action: Action, ctx: Context) -> Decision:
    """A party reads a client's data only under a permission of the customer valid now (concealed otherwise)."""
    if ctx.permission_id is not None:
        return Decision(True, f"party:permission:{ctx.permission_id}")
    return Decision(False, "none", f"no permission of the customer, valid now, covers this read of "
                                   f"{_PARTY_READS[action]}", conceal=True)


def visible_suppliers(who: Principal, periods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The supplier periods ``who`` may see of a client it may read: all of them for the DSO, only its own for a
    retailer (never the previous or the next supplier)."""
    if who.kind == "retailer":
        return [p for p in periods if p["retailer_id"] == who.retailer_id]
    return list(periods)
