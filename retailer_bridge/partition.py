"""A retailer's bridge over several processes: a partition by gateway (issue 14, item 3).

``partitions = K`` bridge processes of one retailer, each given ``partition = k`` (0 ≤ k < K), its own store and
its own logins (``docs/architecture.md``, "A retailer's bridge partitioned by gateway"). Process k owns the
gateways whose stable hash mod K is k (:func:`partition_of`: CRC-32 of the gateway id, the same in every process,
Python version and machine, unlike ``hash()``), and the clients of those gateways; a client with no gateway on
record (it can only be refused) is owned by the hash of its client id, so that every client has exactly one owner.

Every process receives every message the hub sends the retailer (one ``down`` topic). At the retailer broker each
subscribes to the uplinks of its own gateways only, one filter per gateway (:func:`uplink_filters`; issue 14, fifth
round), so the broker does not deliver it the others' traffic at all; an unpartitioned bridge keeps the one filter
of every gateway's uplink. A gateway added to or removed from the installation record at run time is subscribed
or unsubscribed by its owner (``Bridge.update_installations``). :class:`PartitionGate` keeps, before the relay sees
them, only its own share (for the gateways' uplinks a second line of defence: what an earlier run's persistent
session still holds is dropped there):

- a request or billing delivery is cut down to the process's own clients (all of them acknowledge the message to
  the hub once their share is stored, each acknowledgement naming its partition, and the hub re-sends the message
  until every partition has acknowledged it, see ``cloud_hub.partition_acks``);
- a gateway's message (telemetry, acknowledgement, outcome, presence) is read only by its gateway's owner: the
  sender is in the topic, which the retailer broker's ACL binds to the gateway's login, so foreign traffic is
  dropped before it is decoded;
- the rest (cancellations, tariffs, customer announcements, the hub's acknowledgements) is per retailer and goes
  to the relay unchanged: each process's store holds only its own commands and outbox, so a cancellation or an
  acknowledgement names nothing in the others' stores, and changes nothing there.

The decisions are pure functions (:func:`partition_of`, :class:`Partition`), tested with tables of cases.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import AckPartition, BillingData, Request

MAX_PARTITIONS = 64
"""More bridge processes of one retailer than this is a configuration mistake, not a deployment."""


def partition_of(key: str, partitions: int) -> int:
    """The partition (0 ≤ k < ``partitions``) of a gateway id (or of a client id with no gateway): stable."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    return zlib.crc32(key.encode("utf-8")) % partitions


def partition_logins(retailer_id: str, partition: int) -> tuple[str, str]:
    """A bridge partition's logins (hub broker, retailer broker), the convention of the deployments this project
    starts (``mhp-stack``, the fan-out experiment): partition 0 keeps the retailer's own and ``bridge``; partition
    k > 0 has ``{retailer_id}.p{k}`` (a delegate of the retailer at the hub broker) and ``bridge.p{k}``."""
    return (retailer_id, "bridge") if partition == 0 else (f"{retailer_id}.p{partition}", f"bridge.p{partition}")


@dataclass(frozen=True, slots=True)
class Partition:
    """Process ``index`` of ``count`` of one retailer's bridge."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"partition must be between 0 and {self.count - 1} (partitions {self.count}), "
                             f"not {self.index}")

    @property
    def whole(self) -> bool:
        """One process serves the whole retailer (no partitioning)."""
        return self.count == 1

    def owns_gateway(self, gateway_id: str) -> bool:
        """Whether this process serves ``gateway_id``."""
        return self.whole or partition_of(gateway_id, self.count) == self.index

    def owns_client(self, client_id: str, gateway_of: Mapping[str, str]) -> bool:
        """Whether this process answers for ``client_id``: its gateway's owner, else (no gateway on record) the
        owner of the client id's own hash."""
        if self.whole:
            return True
        gid = gateway_of.get(client_id)
        return partition_of(gid if gid is not None else client_id, self.count) == self.index

    def customers(self, customers: Mapping[str, str]) -> dict[str, str]:
        """This process's share of ``client_id -> gateway_id``."""
        return {c: g for c, g in customers.items() if self.owns_gateway(g)}


class PartitionGate:
    """Cuts the hub's and the gateways' traffic down to one partition's share before a :class:`BridgeRelay` sees
    it (installed with :meth:`install`). ``dropped`` counts what was another partition's, by kind."""

    def __init__(self, partition: Partition, all_customers: Mapping[str, str]) -> None:
        self.partition = partition
        self.gateway_of = dict(all_customers)
        """Every customer's gateway (the whole retailer's installation record): who owns a client."""
        self.dropped: Counter[str] = Counter()

    def request(self, req: Request) -> Request:
        """The request with only this partition's clients (possibly none: it is still acknowledged)."""
        mine = [c for c in req.client_ids if self.partition.owns_client(c, self.gateway_of)]
        if len(mine) == len(req.client_ids):
            return req
        self.dropped["request_clients"] += len(req.client_ids) - len(mine)
        return req.model_copy(update={"client_ids": mine})

    def billing(self, msg: BillingData) -> BillingData:
        """The billing delivery with only this partition's clients."""
        mine = [c for c in msg.clients if self.partition.owns_client(c.client_id, self.gateway_of)]
        if len(mine) == len(msg.clients):
            return msg
        self.dropped["billing_clients"] += len(msg.clients) - len(mine)
        return msg.model_copy(update={"clients": mine})

    def gateway_topic(self, topic: str) -> bool:
        """Whether a message on ``topic`` (of the retailer broker) is this partition's to read: a gateway's own
        subtree only when it is this partition's gateway; anything else (not a party's topic) is read."""
        gid = topics.sender_of(topic)
        if gid is None or self.partition.owns_gateway(gid):
            return True
        self.dropped["gateway_messages"] += 1
        return False

    def install(self, relay: Any) -> None:
        """Put the gate in front of ``relay`` (a :class:`retailer_bridge.relay.BridgeRelay`): its handlers of the
        hub's requests and billing deliveries, and its handler of the retailer broker's messages."""
        if self.partition.whole:
            return
        relay.ack_partition = AckPartition(index=self.partition.index, of=self.partition.count)
        handlers: dict[type, Callable[[Any], Awaitable[None]]] = relay.from_hub.handlers
        on_request, on_billing = handlers[Request], handlers[BillingData]

        async def request(msg: Request) -> None:
            await on_request(self.request(msg))

        async def billing(msg: BillingData) -> None:
            await on_billing(self.billing(msg))

        handlers[Request], handlers[BillingData] = request, billing
        on_local = relay.on_local_message

        async def local(topic: str, payload: bytes, retained: bool) -> None:
            if self.gateway_topic(topic):
                await on_local(topic, payload, retained)

        relay.on_local_message = local
        relay.local_gate = self.gateway_topic


def uplink_filters(partition: Partition, customers: Mapping[str, str]) -> list[str]:
    """What a bridge process subscribes to at its retailer broker: unpartitioned, every gateway's uplink (one
    filter, as before partitions); partition k, the uplink subtree of each gateway it owns in ``customers``
    (``client_id -> gateway_id``, the whole installation record), one filter per gateway."""
    if partition.whole:
        return [topics.all_up("gateways")]
    return sorted({topics.party_up("gateways", g) for g in partition.customers(customers).values()})


def foreign_filters(partition: Partition, customers: Mapping[str, str]) -> list[str]:
    """Filters a partition's persistent session at the retailer broker may still hold from an earlier run and that
    are not its own: every gateway's uplink (a run before partitions subscribed per gateway, or partition 0's login
    used unpartitioned) and each gateway of the record that another partition owns (the number of partitions
    changed). A partitioned bridge unsubscribes them when it starts; none for an unpartitioned one."""
    if partition.whole:
        return []
    mine = set(uplink_filters(partition, customers))
    others = {topics.party_up("gateways", g) for g in customers.values()} - mine
    return [topics.all_up("gateways"), *sorted(others)]


def describe(partition: Partition, customers: Mapping[str, str]) -> str:
    """One log line: which partition this is and how many customers it serves."""
    if partition.whole:
        return f"all {len(customers)} customers"
    return (f"partition {partition.index} of {partition.count}: {len(partition.customers(customers))} of "
            f"{len(customers)} customers")



class StoreOfAnotherPartition(ValueError):
    """A bridge was started on a store that another partition (or an unpartitioned bridge) has used."""


def partition_file(db_path: Path) -> Path:
    """The file next to a partition's store that names its partition (``0 of 2``)."""
    return db_path.with_name(db_path.name + ".partition")


def claim_store(db_path: Path, partition: Partition) -> None:
    """Bind the store at ``db_path`` to ``partition``, or refuse a store that is not this partition's: two partitions
    on one store would each send the other's commands (whose acknowledgements only the owner reads), and a store
    used with another K holds commands of gateways that now belong elsewhere. A partitioned bridge writes
    ``<db_path>.partition`` on its first start (a new store only); an unpartitioned one writes nothing and refuses a
    store that has such a file."""
    path = partition_file(db_path)
    mine = f"{partition.index} of {partition.count}"
    try:
        held: str | None = path.read_text().strip()
    except FileNotFoundError:
        held = None
    if partition.whole:
        if held is not None:
            raise StoreOfAnotherPartition(f"{db_path} is the store of bridge partition {held} ({path}); this bridge "
                                          "is not partitioned: give it a store of its own")
        return
    if held is None:
        if db_path.exists():
            raise StoreOfAnotherPartition(f"{db_path} was used by an unpartitioned bridge; partition {mine} needs a "
                                          "new store (docs/decisions.md: changing the number of partitions)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this retailer created it just now: compare below
            held = path.read_text().strip()
        else:
            with os.fdopen(fd, "w") as f:
                f.write(mine + "\n")
            return
    if held != mine:
        raise StoreOfAnotherPartition(f"{db_path} is the store of bridge partition {held} ({path}), not of "
                                      f"partition {mine}: each partition needs a store of its own")
