"""The bridge's customer list: who is this retailer's customer when, and which gateway is each one's home.

Two sources, each for what it knows. The **hub** knows who supplies whom when (supplier periods): its ``customers``
messages give, per client, every period in which this retailer supplies it, with a ``revision`` that grows with each
change of the client's supplier history. The **installation record** (settings ``customers``/``customers_file``:
``client_id -> gateway_id``) knows which gateway is in each home; the hub does not know gateways. So:

* a client the hub has announced is a customer exactly inside its periods, with or without a gateway (a client
  gained before its gateway is installed is a customer with no gateway yet);
* a client of the installation record that the hub has never mentioned is a customer without a time limit, as
  before customer lists followed the hub (a bridge whose hub does not announce, or a client registered earlier).

Pure: no I/O; the relay stores what it applies (``BridgeStore.put_customers``) before it acknowledges the hub.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from mhp_wire.messages import CustomerChange

Period = tuple[float, float | None]
"""``(from, until)`` in epoch seconds; ``until`` None: open-ended."""

Standing = Literal["customer", "not_yet", "moved", "stranger"]
"""A client's relation to this retailer at one time: a customer; one whose supply here starts later; one whose supply
here has ended (moved to another supplier); never one (or not known)."""


@dataclass(frozen=True, slots=True)
class Announced:
    """What the hub last said about one client: its periods with this retailer, at ``revision``."""

    revision: int
    periods: tuple[Period, ...]


def periods_of(change: CustomerChange) -> tuple[Period, ...]:
    """The periods of a hub announcement as epoch seconds."""
    return tuple((p.valid_from.timestamp(), None if p.valid_until is None else p.valid_until.timestamp())
                 for p in change.periods)


@dataclass(frozen=True, slots=True)
class Status:
    """A client's standing at one time and the edge that decides it (``since``: start of the current period or
    end of the last one; ``until``: end of the current period or start of the next one), None when unbounded."""

    standing: Standing
    since: float | None = None
    until: float | None = None


_CUSTOMER = Status("customer")
"""A customer without a time limit (one the hub never announced): one shared instance (it is frozen), since the
status is asked for each gateway's outcome and a frozen dataclass costs ~0.5 µs to build."""
_STRANGER = Status("stranger")

class CustomerList:
    """Who is a customer when (the hub's announcements over the installation record) and where their gateway is."""

    def __init__(self, gateways: Mapping[str, str], announced: Mapping[str, Announced] | None = None) -> None:
        self.gateways = dict(gateways)
        """``client_id -> gateway_id``: the installation record."""
        self.announced: dict[str, Announced] = dict(announced or {})

    def newer(self, changes: Iterable[CustomerChange]) -> list[CustomerChange]:
        """The changes that are newer than what is known (a re-sent or late older revision is not)."""
        out = []
        for c in changes:
            known = self.announced.get(c.client_id)
            if known is None or c.revision > known.revision:
                out.append(c)
        return out

    def apply(self, changes: Iterable[CustomerChange]) -> list[str]:
        """Take the newer of ``changes``; returns the clients changed."""
        changed = []
        for c in self.newer(changes):
            self.announced[c.client_id] = Announced(c.revision, periods_of(c))
            changed.append(c.client_id)
        return changed

    def gateway_of(self, client_id: str) -> str | None:
        """The gateway installed in the client's home, or None (not recorded)."""
        return self.gateways.get(client_id)

    def known(self, client_id: str) -> bool:
        """Whether the client is, was or will be a customer at some time (so its data may concern us)."""
        known = self.announced.get(client_id)
        return bool(known.periods) if known is not None else client_id in self.gateways

    def status(self, client_id: str, at: float) -> Status:
        """The client's standing at ``at``."""
        known = self.announced.get(client_id)
        if known is None:
            return _CUSTOMER if client_id in self.gateways else _STRANGER
        ended: float | None = None
        for start, end in known.periods:
            if at < start:
                return Status("not_yet", ended, start)
            if end is None or at < end:
                return Status("customer", start, end)
            ended = end
        return Status("moved", ended) if ended is not None else _STRANGER

    def is_customer(self, client_id: str, at: float) -> bool:
        """Whether the client is a customer at ``at``: :meth:`status`'s ``standing == "customer"`` without building
        the :class:`Status` (asked for each gateway's outcome, and a customer's status is a new object each time)."""
        known = self.announced.get(client_id)
        if known is None:
            return client_id in self.gateways
        for start, end in known.periods:
            if at < start:
                return False
            if end is None or at < end:
                return True
        return False

    def client_of(self, gateway_id: str, client_id: str, at: float) -> bool:
        """Whether ``gateway_id`` may speak for ``client_id`` about ``at``: it is the client's recorded gateway and
        the client is a customer then."""
        return self.gateways.get(client_id) == gateway_id and self.is_customer(client_id, at)
